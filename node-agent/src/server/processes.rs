//! Detached-process RPCs (start, list, signal, attach), each forwarded to
//! the capsule's guest agent, which owns the processes and their output
//! rings; its own status (a tag in use, an unknown tag, a process that
//! already exited) passes through with the capsule named. An attach
//! counts as activity on the capsule for as long as it is open; ending
//! it leaves the process running.

use tonic::{Request, Response, Status};
use wrenn_proto::agent::v1 as pb;
use wrenn_proto::guest::v1 as gpb;

use super::activity::keep_open;
use super::dataplane::{client, need_uid, to_status};
use super::{AgentService, BoxStream};

/// Most arguments plus environment bytes a start may carry: the guest
/// takes more, but nobody needs more on a command line.
pub const MAX_START_BYTES: usize = 256 << 10;

fn required<T>(field: Option<T>, rpc: &str) -> Result<T, Status> {
    field.ok_or_else(|| Status::invalid_argument(format!("{rpc}: request is required")))
}

/// Refuses a start whose command line and environment are too large (pure).
fn check_start(req: &gpb::StartProcessRequest) -> Result<(), Status> {
    let bytes: usize = req.argv.iter().map(String::len).sum::<usize>()
        + req
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + req.cwd.len()
        + req.user.len()
        + req.tag.len();
    if req.argv.is_empty() {
        return Err(Status::invalid_argument("StartProcess: argv is empty"));
    }
    if bytes > MAX_START_BYTES {
        return Err(Status::invalid_argument(format!(
            "StartProcess: command, environment and tag of {bytes} bytes exceed {MAX_START_BYTES}"
        )));
    }
    Ok(())
}

pub(super) async fn start(
    svc: &AgentService,
    req: Request<pb::StartProcessRequest>,
) -> Result<Response<gpb::ProcessInfo>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "StartProcess")?;
    check_start(&inner)?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .start_process(inner)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn list(
    svc: &AgentService,
    req: Request<pb::CapsuleRef>,
) -> Result<Response<gpb::ListProcessesResponse>, Status> {
    let req = req.into_inner();
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .list_processes()
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn signal(
    svc: &AgentService,
    req: Request<pb::SignalProcessRequest>,
) -> Result<Response<gpb::ProcessInfo>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "SignalProcess")?;
    let guest = client(&svc.guest_endpoint(need_uid(&req.uid)?).await?).await?;
    guest
        .signal_process(inner)
        .await
        .map(Response::new)
        .map_err(to_status)
}

pub(super) async fn attach(
    svc: &AgentService,
    req: Request<pb::AttachProcessRequest>,
) -> Result<Response<BoxStream<gpb::ProcessOutput>>, Status> {
    let req = req.into_inner();
    let inner = required(req.request, "AttachProcess")?;
    let ep = svc.guest_endpoint(need_uid(&req.uid)?).await?;
    let guest = client(&ep).await?;
    let out = guest.attach_process(inner).await.map_err(to_status)?;
    Ok(Response::new(keep_open(Box::pin(out), ep.open.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_needs_a_command_and_stays_small() {
        let ok = gpb::StartProcessRequest {
            argv: vec!["sleep".into(), "1".into()],
            ..Default::default()
        };
        assert!(check_start(&ok).is_ok());
        assert!(check_start(&gpb::StartProcessRequest::default()).is_err());
        let big = gpb::StartProcessRequest {
            argv: vec!["x".repeat(MAX_START_BYTES + 1)],
            ..Default::default()
        };
        assert_eq!(
            check_start(&big).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
