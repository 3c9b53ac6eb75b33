//! Rules a CRD schema cannot hold, evaluated by ValidatingAdmissionPolicies
//! in the API server so the user is refused at `kubectl apply` time, like
//! every other invalid spec:
//! - a capsule's disk must be at least its template's (it spans two
//!   objects: the capsule's namespace's CapsuleTemplates are parameters);
//! - only namespaces a cluster admin labelled
//!   [`NODE_IMAGES`](crate::names::label::NODE_IMAGES)`=allowed` may have
//!   CapsuleTemplates that name files on nodes (it depends on the
//!   namespace, which a namespace user cannot label).
//!
//! And one MutatingAdmissionPolicy: a Capsule is created with the
//! operator's finalizer already on ([`finalizer_policy`]).

use k8s_openapi::api::admissionregistration::v1::{
    JSONPatch, MatchResources, MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding,
    MutatingAdmissionPolicyBindingSpec, MutatingAdmissionPolicySpec, Mutation,
    NamedRuleWithOperations, ParamKind, ParamRef, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use serde_json::Value;

use crate::names::label::{NODE_IMAGES, NODE_IMAGES_ALLOWED};
use crate::names::{FINALIZER, GROUP, VERSION};

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

/// What both policies match: Capsule creates.
fn capsule_creates() -> MatchResources {
    MatchResources {
        resource_rules: Some(vec![NamedRuleWithOperations {
            api_groups: Some(vec![GROUP.into()]),
            api_versions: Some(vec![VERSION.into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["capsules".into()]),
            ..NamedRuleWithOperations::default()
        }]),
        ..MatchResources::default()
    }
}

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
            match_constraints: Some(capsule_creates()),
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

/// Name of the node-images policy and of its binding.
pub const NODE_IMAGES_POLICY: &str = "capsuletemplate-node-images.wrenn.dev";

/// One node-file field: (rule, message). Each rule passes when the field is
/// absent, or on an update leaves it as it was: a namespace whose label is
/// removed can still have its existing templates' finalizers and other
/// fields edited, and deleted.
const NODE_IMAGE_RULES: [(&str, &str); 3] = [
    (
        "!has(object.spec.source.rootfs) || !has(object.spec.source.rootfs.path) \
         || (oldObject != null && has(oldObject.spec.source.rootfs) \
             && has(oldObject.spec.source.rootfs.path) \
             && oldObject.spec.source.rootfs.path == object.spec.source.rootfs.path)",
        "spec.source.rootfs.path names a file on the node",
    ),
    (
        "!has(object.spec.kernel) \
         || (oldObject != null && has(oldObject.spec.kernel) && oldObject.spec.kernel == object.spec.kernel)",
        "spec.kernel names a kernel file on the node",
    ),
    (
        "!has(object.spec.source.image) \
         || !(object.spec.source.image.reference.startsWith('oci:') \
              || object.spec.source.image.reference.startsWith('docker-archive:')) \
         || (oldObject != null && has(oldObject.spec.source.image) \
             && oldObject.spec.source.image.reference == object.spec.source.image.reference)",
        "spec.source.image.reference names an image directory on the node (oci: or docker-archive:)",
    ),
];

/// Refuses CapsuleTemplates that name node files (`rootfs.path`, `kernel`,
/// `oci:`/`docker-archive:` images) outside namespaces labelled
/// [`NODE_IMAGES`]`=`[`NODE_IMAGES_ALLOWED`]. The binding selects the
/// namespaces without that label, so the rules never see the others.
pub fn node_images_policy() -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let validations = NODE_IMAGE_RULES
        .iter()
        .map(|(rule, what)| Validation {
            expression: (*rule).into(),
            message: Some(format!(
                "{what}; only namespaces a cluster admin labelled \
                 {NODE_IMAGES}={NODE_IMAGES_ALLOWED} may name node files; \
                 use spec.source.image with a registry reference instead"
            )),
            reason: Some("Forbidden".into()),
            ..Validation::default()
        })
        .collect();
    let policy = ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(NODE_IMAGES_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec![GROUP.into()]),
                    api_versions: Some(vec![VERSION.into()]),
                    operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                    resources: Some(vec!["capsuletemplates".into()]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            validations: Some(validations),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    };
    let binding = ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(NODE_IMAGES_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: NODE_IMAGES_POLICY.into(),
            // NotIn also selects namespaces without the label.
            match_resources: Some(MatchResources {
                namespace_selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: NODE_IMAGES.into(),
                        operator: "NotIn".into(),
                        values: Some(vec![NODE_IMAGES_ALLOWED.into()]),
                    }]),
                    ..LabelSelector::default()
                }),
                ..MatchResources::default()
            }),
            validation_actions: vec!["Deny".into()],
            ..ValidatingAdmissionPolicyBindingSpec::default()
        },
    };
    (policy, binding)
}

/// Name of the finalizer policy and of its binding.
pub const FINALIZER_POLICY: &str = "capsule-finalizer.wrenn.dev";

/// Adds [`FINALIZER`] to a Capsule as it is created, unless the object
/// carries it already. A Capsule's start waits on each of its writes, and
/// this saves the operator's first one (its finalizer patch): from apply to
/// Running the operator then writes status only. `failurePolicy: Ignore`:
/// a policy that fails (or a cluster without it) leaves the add to the
/// operator, as before. Templates and snapshots are not on a start's
/// path; the operator adds theirs.
pub fn finalizer_policy() -> (MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding) {
    let expression = format!(
        "!has(object.metadata.finalizers) \
           ? [JSONPatch{{op: 'add', path: '/metadata/finalizers', value: ['{FINALIZER}']}}] \
         : object.metadata.finalizers.exists(f, f == '{FINALIZER}') ? [] \
         : [JSONPatch{{op: 'add', path: '/metadata/finalizers/-', value: '{FINALIZER}'}}]"
    );
    let policy = MutatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(FINALIZER_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: Some(MutatingAdmissionPolicySpec {
            failure_policy: Some("Ignore".into()),
            reinvocation_policy: Some("Never".into()),
            match_constraints: Some(capsule_creates()),
            mutations: Some(vec![Mutation {
                patch_type: "JSONPatch".into(),
                json_patch: Some(JSONPatch {
                    expression: Some(expression),
                }),
                ..Mutation::default()
            }]),
            ..MutatingAdmissionPolicySpec::default()
        }),
    };
    let binding = MutatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(FINALIZER_POLICY.into()),
            ..ObjectMeta::default()
        },
        spec: Some(MutatingAdmissionPolicyBindingSpec {
            policy_name: Some(FINALIZER_POLICY.into()),
            ..MutatingAdmissionPolicyBindingSpec::default()
        }),
    };
    (policy, binding)
}

/// Every policy and binding as YAML-ready documents with apiVersion and kind.
pub fn documents() -> Result<Vec<Value>, serde_json::Error> {
    let mut docs = Vec::new();
    for (policy, binding) in [disk_policy(), node_images_policy()] {
        docs.push(with_type_meta(
            "ValidatingAdmissionPolicy",
            serde_json::to_value(&policy)?,
        ));
        docs.push(with_type_meta(
            "ValidatingAdmissionPolicyBinding",
            serde_json::to_value(&binding)?,
        ));
    }
    let (policy, binding) = finalizer_policy();
    docs.push(with_type_meta(
        "MutatingAdmissionPolicy",
        serde_json::to_value(&policy)?,
    ));
    docs.push(with_type_meta(
        "MutatingAdmissionPolicyBinding",
        serde_json::to_value(&binding)?,
    ));
    Ok(docs)
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
