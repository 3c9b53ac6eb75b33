//! `pause`, `resume` and `suspend`: a merge patch of the capsule's
//! `spec.operatingMode` under our own field manager (only that field is
//! sent, so a GitOps tool's other fields stay as they are), then a wait
//! until the operator reports the matching phase for that spec. The
//! operator does the work; we only state the intent and watch.

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use wrenn_crds::Capsule;
use wrenn_crds::capsule::{CapsulePhase, OperatingMode};
use wrenn_crds::names::CLI_FIELD_MANAGER;

use crate::cluster::{self, Target};
use crate::wait::{self, WaitFor};

/// Why a mode change failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused the patch.
    #[error("set capsule {capsule:?} to {mode:?}")]
    Patch {
        /// The capsule.
        capsule: String,
        /// The mode asked for.
        mode: OperatingMode,
        /// Why.
        #[source]
        source: cluster::Error,
    },
    /// The spec changed but the phase did not follow.
    #[error("capsule {capsule:?} was set to {mode:?}")]
    Wait {
        /// The capsule.
        capsule: String,
        /// The mode asked for.
        mode: OperatingMode,
        /// Why waiting ended.
        #[source]
        source: wait::Error,
    },
}

/// The body of the merge patch that asks for `mode` (pure).
pub fn build_mode_patch(mode: OperatingMode) -> Value {
    json!({ "spec": { "operatingMode": mode } })
}

/// The phase that shows `mode` is in effect (pure).
pub fn plan_phase(mode: OperatingMode) -> CapsulePhase {
    match mode {
        OperatingMode::Running => CapsulePhase::Running,
        OperatingMode::Paused => CapsulePhase::Paused,
        OperatingMode::Suspended => CapsulePhase::Suspended,
    }
}

/// Options of every write the plugin makes.
pub fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(CLI_FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Sets `capsule`'s mode and, with a `timeout`, waits for its phase.
/// Returns the capsule as last seen.
pub async fn set_mode(
    target: &Target,
    capsule: &str,
    mode: OperatingMode,
    timeout: Option<Duration>,
) -> Result<Capsule, Error> {
    let api: Api<Capsule> = Api::namespaced(target.client.clone(), &target.namespace);
    let patched = api
        .patch(
            capsule,
            &write_params(),
            &Patch::Merge(build_mode_patch(mode)),
        )
        .await
        .map_err(|e| Error::Patch {
            capsule: capsule.into(),
            mode,
            source: target.refusal(e, "capsule", capsule),
        })?;
    let Some(timeout) = timeout else {
        return Ok(patched);
    };
    // The generation that carries this mode (the same one when the mode
    // already was this): only a status the operator wrote for it counts.
    let want = WaitFor::Phase(plan_phase(mode));
    wait::capsule(target, capsule, want, patched.metadata.generation, timeout)
        .await
        .map_err(|source| Error::Wait {
            capsule: capsule.into(),
            mode,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_sets_only_the_operating_mode_as_the_crd_spells_it() {
        assert_eq!(
            build_mode_patch(OperatingMode::Paused),
            json!({ "spec": { "operatingMode": "Paused" } })
        );
        assert_eq!(
            build_mode_patch(OperatingMode::Suspended),
            json!({ "spec": { "operatingMode": "Suspended" } })
        );
        assert_eq!(
            build_mode_patch(OperatingMode::Running),
            json!({ "spec": { "operatingMode": "Running" } })
        );
    }

    #[test]
    fn the_patch_is_a_valid_partial_capsule_spec() {
        // The merge patch applied to a capsule must still read as one.
        let mut c = json!({
            "apiVersion": "wrenn.dev/v1alpha1", "kind": "Capsule",
            "metadata": { "name": "box" },
            "spec": { "source": { "templateRef": { "name": "base" } } },
        });
        c["spec"]["operatingMode"] =
            build_mode_patch(OperatingMode::Suspended)["spec"]["operatingMode"].clone();
        let c: Capsule = serde_json::from_value(c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.spec.operating_mode, OperatingMode::Suspended);
    }

    #[test]
    fn each_mode_is_awaited_as_its_phase() {
        assert_eq!(plan_phase(OperatingMode::Paused), CapsulePhase::Paused);
        assert_eq!(
            plan_phase(OperatingMode::Suspended),
            CapsulePhase::Suspended
        );
        assert_eq!(plan_phase(OperatingMode::Running), CapsulePhase::Running);
    }

    #[test]
    fn writes_are_made_under_the_plugins_field_manager() {
        assert_eq!(
            write_params().field_manager.as_deref(),
            Some("kubectl-wrenn")
        );
    }
}
