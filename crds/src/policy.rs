//! The one rule a CRD schema cannot hold because it spans two objects: a
//! capsule's disk must be at least its template's. A
//! ValidatingAdmissionPolicy evaluates it in the API server with the
//! capsule's namespace's CapsuleTemplates as parameters, so the user is
//! refused at `kubectl apply` time, like every other invalid spec.

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ParamKind, ParamRef, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde_json::Value;

use crate::names::{GROUP, VERSION};

/// Name of the policy and of its binding.
pub const DISK_POLICY: &str = "capsule-disk-at-least-template.wrenn.dev";

/// Every evaluation sees one template of the namespace as `params`; only the
/// one the capsule names constrains it. Capsules without an explicit disk
/// take the template's, and templates without defaults use the 2Gi default.
const DISK_RULE: &str = "!has(object.spec.source.templateRef) \
    || params.metadata.name != object.spec.source.templateRef.name \
    || !has(object.spec.resources) || !has(object.spec.resources.disk) \
    || !isQuantity(object.spec.resources.disk) \
    || quantity(object.spec.resources.disk).compareTo(quantity( \
         has(params.spec.defaults) && has(params.spec.defaults.disk) && isQuantity(params.spec.defaults.disk) \
         ? params.spec.defaults.disk : '2Gi')) >= 0";

const DISK_MESSAGE: &str = "'resources.disk ' + string(object.spec.resources.disk) \
    + ' is smaller than the disk of template ' + params.metadata.name + ' (' \
    + (has(params.spec.defaults) && has(params.spec.defaults.disk) ? string(params.spec.defaults.disk) : '2Gi') \
    + '); ask for at least that much or leave resources.disk unset'";

/// The policy and its binding, as API objects.
pub fn disk_policy() -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let policy = ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(DISK_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            param_kind: Some(ParamKind {
                api_version: Some(format!("{GROUP}/{VERSION}")),
                kind: Some("CapsuleTemplate".into()),
            }),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec![GROUP.into()]),
                    api_versions: Some(vec![VERSION.into()]),
                    operations: Some(vec!["CREATE".into()]),
                    resources: Some(vec!["capsules".into()]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            validations: Some(vec![Validation {
                expression: DISK_RULE.into(),
                message_expression: Some(DISK_MESSAGE.into()),
                reason: Some("Invalid".into()),
                ..Validation::default()
            }]),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    };
    let binding = ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(DISK_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: DISK_POLICY.into(),
            // An empty selector matches every template in the capsule's own
            // namespace (no namespace set on a namespaced param kind).
            param_ref: Some(ParamRef {
                selector: Some(LabelSelector::default()),
                parameter_not_found_action: Some("Allow".into()),
                ..ParamRef::default()
            }),
            validation_actions: vec!["Deny".into()],
            ..ValidatingAdmissionPolicyBindingSpec::default()
        },
    };
    (policy, binding)
}

/// The policy and binding as YAML-ready documents with apiVersion and kind.
pub fn documents() -> Result<Vec<Value>, serde_json::Error> {
    let (policy, binding) = disk_policy();
    Ok(vec![
        with_type_meta("ValidatingAdmissionPolicy", serde_json::to_value(&policy)?),
        with_type_meta(
            "ValidatingAdmissionPolicyBinding",
            serde_json::to_value(&binding)?,
        ),
    ])
}

fn with_type_meta(kind: &str, object: Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(
        "apiVersion".into(),
        "admissionregistration.k8s.io/v1".into(),
    );
    out.insert("kind".into(), kind.into());
    if let Value::Object(fields) = object {
        out.extend(fields);
    }
    Value::Object(out)
}
