//! [`FakeNet`]: a [`NetOps`] that records its calls and touches nothing, for
//! unit tests of the capsule supervisor.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::addr::{AddressPlan, GUEST_ADDR, GUEST_GATEWAY, GUEST_MAC};
use super::{
    CapsuleId, CapsuleNet, EgressPolicy, Error, HostPort, NetOps, PortRule, SetupStep, SweepReport,
    TAP_NAME, Teardown,
};

/// First host port the fake hands out.
const FAKE_FIRST_HOST_PORT: u16 = 29000;

/// A call made to a [`FakeNet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetCall {
    /// [`NetOps::ensure_node`].
    EnsureNode,
    /// [`NetOps::setup`].
    Setup(CapsuleId, EgressPolicy),
    /// [`NetOps::update_policy`].
    UpdatePolicy(CapsuleId, EgressPolicy),
    /// [`NetOps::set_names`].
    SetNames(CapsuleId, super::Names),
    /// [`NetOps::publish`].
    Publish(CapsuleId, Vec<PortRule>),
    /// [`NetOps::ensure_tap`].
    EnsureTap(CapsuleId),
    /// [`NetOps::teardown`].
    Teardown(CapsuleId, Teardown),
    /// [`NetOps::sweep`].
    Sweep,
}

/// Records calls; hands out slots in memory; fails on request.
#[derive(Debug, Default)]
pub struct FakeNet {
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<NetCall>,
    slots: BTreeMap<CapsuleId, u32>,
    built: Vec<CapsuleId>,
    fail_setup: Option<SetupStep>,
    ports: BTreeMap<CapsuleId, Vec<HostPort>>,
    /// Made by the first [`NetOps::take_name_refusals`].
    refusals: Option<tokio::sync::mpsc::Sender<super::dns::NameRefused>>,
}

impl FakeNet {
    /// A fake with no capsules.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<NetCall> {
        self.state().calls.clone()
    }

    /// Makes the next setup (or policy update) fail as if `step` had failed.
    pub fn fail_next_setup(&self, step: SetupStep) {
        self.state().fail_setup = Some(step);
    }

    /// Capsules whose network currently exists.
    pub fn built(&self) -> Vec<CapsuleId> {
        self.state().built.clone()
    }

    /// Reports `refused` as a resolver would; `false` before anyone took
    /// the reports or when they are full.
    pub fn refuse_name(&self, refused: super::dns::NameRefused) -> bool {
        self.state()
            .refusals
            .as_ref()
            .is_some_and(|tx| tx.try_send(refused).is_ok())
    }

    /// The slot a capsule holds.
    pub fn slot(&self, capsule: &CapsuleId) -> Option<u32> {
        self.state().slots.get(capsule).copied()
    }
}

impl NetOps for FakeNet {
    fn ensure_node(&self) -> Result<(), Error> {
        self.state().calls.push(NetCall::EnsureNode);
        Ok(())
    }

    fn setup(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<CapsuleNet, Error> {
        let mut st = self.state();
        st.calls
            .push(NetCall::Setup(capsule.clone(), policy.clone()));
        if let Some(step) = st.fail_setup.take() {
            return Err(Error::Injected {
                capsule: capsule.clone(),
                step,
            });
        }
        let slot = match st.slots.get(capsule) {
            Some(s) => *s,
            None => {
                let s = (1..)
                    .find(|s| !st.slots.values().any(|v| v == s))
                    .unwrap_or(1);
                st.slots.insert(capsule.clone(), s);
                s
            }
        };
        if !st.built.contains(capsule) {
            st.built.push(capsule.clone());
        }
        let plan = AddressPlan::default();
        let addrs = plan.slot_addrs(slot).ok_or_else(|| Error::SlotsExhausted {
            capsule: capsule.clone(),
        })?;
        Ok(CapsuleNet {
            capsule: capsule.clone(),
            slot,
            netns: format!("/run/netns/{}", capsule.resource_name()).into(),
            tap: TAP_NAME.into(),
            node_veth: capsule.resource_name(),
            addrs,
            guest: GUEST_ADDR,
            gateway: GUEST_GATEWAY,
            mac: GUEST_MAC,
        })
    }

    fn take_name_refusals(&self) -> Option<tokio::sync::mpsc::Receiver<super::dns::NameRefused>> {
        let mut st = self.state();
        if st.refusals.is_some() {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        st.refusals = Some(tx);
        Some(rx)
    }

    fn set_names(
        &self,
        capsule: &CapsuleId,
        _policy: &EgressPolicy,
        names: &super::Names,
    ) -> Result<(), Error> {
        let mut st = self.state();
        st.calls
            .push(NetCall::SetNames(capsule.clone(), names.clone()));
        if !st.built.contains(capsule) {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        Ok(())
    }

    fn update_policy(&self, capsule: &CapsuleId, policy: &EgressPolicy) -> Result<(), Error> {
        let mut st = self.state();
        st.calls
            .push(NetCall::UpdatePolicy(capsule.clone(), policy.clone()));
        if let Some(step) = st.fail_setup.take() {
            return Err(Error::Injected {
                capsule: capsule.clone(),
                step,
            });
        }
        if st.built.contains(capsule) {
            Ok(())
        } else {
            Err(Error::NotSetUp {
                capsule: capsule.clone(),
            })
        }
    }

    fn publish(&self, capsule: &CapsuleId, rules: &[PortRule]) -> Result<Vec<HostPort>, Error> {
        let mut st = self.state();
        st.calls
            .push(NetCall::Publish(capsule.clone(), rules.to_vec()));
        if !st.slots.contains_key(capsule) {
            return Err(Error::NotSetUp {
                capsule: capsule.clone(),
            });
        }
        let mine = st.ports.get(capsule).cloned().unwrap_or_default();
        let mut next = FAKE_FIRST_HOST_PORT;
        let mut out = Vec::new();
        for r in rules {
            let host_port = match mine.iter().find(|h| h.port == r.port) {
                Some(h) => h.host_port,
                None => {
                    while st
                        .ports
                        .values()
                        .flatten()
                        .chain(&out)
                        .any(|h: &HostPort| h.host_port == next)
                    {
                        next += 1;
                    }
                    next
                }
            };
            out.push(HostPort {
                port: r.port,
                host_port,
            });
        }
        out.sort();
        st.ports.insert(capsule.clone(), out.clone());
        Ok(out)
    }

    fn host_ports(&self, capsule: &CapsuleId) -> Vec<HostPort> {
        self.state().ports.get(capsule).cloned().unwrap_or_default()
    }

    fn ensure_tap(&self, capsule: &CapsuleId) -> Result<(), Error> {
        let mut st = self.state();
        st.calls.push(NetCall::EnsureTap(capsule.clone()));
        if st.built.contains(capsule) {
            Ok(())
        } else {
            Err(Error::NotSetUp {
                capsule: capsule.clone(),
            })
        }
    }

    fn teardown(&self, capsule: &CapsuleId, mode: Teardown) -> Result<(), Error> {
        let mut st = self.state();
        st.calls.push(NetCall::Teardown(capsule.clone(), mode));
        st.built.retain(|c| c != capsule);
        if mode == Teardown::ReleaseSlot {
            st.slots.remove(capsule);
            st.ports.remove(capsule);
        }
        Ok(())
    }

    fn sweep(&self) -> Result<SweepReport, Error> {
        self.state().calls.push(NetCall::Sweep);
        Ok(SweepReport::default())
    }

    fn claims(&self) -> Vec<CapsuleId> {
        self.state().slots.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_and_keeps_slots_across_suspend() {
        let net = FakeNet::new();
        let a = CapsuleId::new("aaa").unwrap();
        let b = CapsuleId::new("bbb").unwrap();
        let na = net.setup(&a, &EgressPolicy::Allow).unwrap();
        let nb = net.setup(&b, &EgressPolicy::Deny).unwrap();
        assert_ne!(na.slot, nb.slot);
        net.teardown(&a, Teardown::KeepSlot).unwrap();
        assert!(net.ensure_tap(&a).is_err());
        assert_eq!(net.setup(&a, &EgressPolicy::Allow).unwrap().slot, na.slot);
        net.fail_next_setup(SetupStep::CreateTap);
        assert!(matches!(
            net.setup(&CapsuleId::new("ccc").unwrap(), &EgressPolicy::Allow),
            Err(Error::Injected {
                step: SetupStep::CreateTap,
                ..
            })
        ));
        assert_eq!(
            net.calls()[..3],
            [
                NetCall::Setup(a.clone(), EgressPolicy::Allow),
                NetCall::Setup(b, EgressPolicy::Deny),
                NetCall::Teardown(a, Teardown::KeepSlot),
            ]
        );
    }
}
