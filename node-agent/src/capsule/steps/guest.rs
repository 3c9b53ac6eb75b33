//! Reaching the guest agent after a boot or restore and sending `Init`,
//! then the resolver file (`names`).
//! The readiness wait gives the guest a third of the budget, heals a
//! wedged host-side vsock once (`Machine::heal_vsock`), then waits the rest.

use super::Ctx;
use crate::capsule::model::Error;
use crate::capsule::record::Record;
use crate::guest::GuestToken;
use crate::vmm::{Machine, MachineHandle};

impl<M: Machine + 'static> Ctx<M> {
    /// Waits until the guest agent answers, then sends `Init` (wall time,
    /// entropy, env, hostname, and the capsule's journaled token,
    /// authorized by `held`: the token the guest already holds, if any).
    /// Skipped when no guest settings are given.
    #[tracing::instrument(skip_all, fields(capsule = %rec.uid, step = "guest_up"))]
    pub(crate) async fn guest_up(
        &self,
        rec: &Record,
        vm: &MachineHandle,
        held: Option<&GuestToken>,
    ) -> Result<(), Error> {
        let Some(g) = self.cfg.guest else {
            return Ok(());
        };
        let err = |action| {
            let uid = rec.uid.clone();
            move |source| Error::Guest {
                action,
                uid,
                source: Box::new(source),
            }
        };
        // Some VMMs' vsock must not be dialed before the guest set it up.
        let t0 = tokio::time::Instant::now();
        let token = held.map_or("", GuestToken::expose);
        let wait = |within| {
            crate::guest::GuestClient::wait_ready(
                &rec.uid,
                &vm.vsock_socket,
                g.port,
                token,
                g.timeouts,
                within,
            )
        };
        let ready = match self.host.machine.wait_vsock(vm, g.ready_within).await {
            // A third of the budget is many boots' worth; a guest silent
            // that long behind a wedged host-side vsock gets a fresh device
            // once (a no-op where the backend's vsock cannot wedge).
            Ok(()) => match wait(g.ready_within / 3).await {
                Ok(r) => Ok(r),
                Err(first) => match self.host.machine.heal_vsock(vm).await {
                    Ok(_) => wait(g.ready_within.saturating_sub(t0.elapsed())).await,
                    Err(e) => {
                        tracing::warn!(capsule = %rec.uid, error = &e as &dyn std::error::Error, "healing the vsock failed");
                        Err(first)
                    }
                },
            }
            .map_err(err("reach")),
            Err(source) => Err(Error::Vm {
                action: "wait for the vsock of",
                uid: rec.uid.clone(),
                source: Box::new(source),
            }),
        };
        let (mut client, _) = match ready {
            Ok(r) => r,
            Err(e) => {
                self.log_host_view(rec, vm, &e).await;
                return Err(e);
            }
        };
        client
            .init(&crate::guest::InitParams {
                env: rec
                    .spec
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                hostname: rec.spec.name.clone(),
                access_token: rec
                    .guest_token
                    .as_ref()
                    .map(|t| t.expose().to_string())
                    .ok_or_else(|| crate::guest::Error::NoToken {
                        capsule: rec.uid.clone(),
                    })
                    .map_err(err("init"))?,
                send_wall_time: true,
            })
            .await
            .map_err(err("init"))?;
        self.write_resolver(rec, &client).await
    }

    /// Logs what the host saw of a VM whose guest never answered
    /// (processes, run state, console, VMM logs): the rollback removes the
    /// VM and its run dir, and the cause with them.
    async fn log_host_view(&self, rec: &Record, vm: &MachineHandle, e: &Error) {
        let mut view = self.host.machine.diagnose(vm).await;
        if view.is_empty() {
            // Only the tail: the guest decides how much it printed.
            let run_dir = self.layout.run_dir(&rec.uid);
            let text = tokio::task::spawn_blocking(move || {
                crate::vmm::logs::console_tail(&run_dir, 16 << 10)
            })
            .await
            .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            view = lines[lines.len().saturating_sub(25)..].join("\n");
        }
        tracing::error!(capsule = %rec.uid, error = %e.chain(), "guest agent never answered; the host's view:\n{view}");
    }
}
