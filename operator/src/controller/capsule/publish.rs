//! Act on published ports: make the capsule's Service and EndpointSlice
//! equal what `crate::publish` builds. Each object is read first and
//! written (server-side apply under `wrenn-operator`) only when what the
//! operator decides differs, so a restarted operator writes nothing; a
//! capsule that no longer publishes a port has them deleted. The garbage
//! collector deletes them with the Capsule (owner references).

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wrenn_crds::Capsule;
use wrenn_crds::names::FIELD_MANAGER;
use wrenn_crds::reason::ConditionType;

use super::{Context, Error};
use crate::plan::{Vm, VmState};
use crate::publish::{
    PublishFacts, build_published, internal_ip, service_shape, slice_name, slice_shape,
};

/// Makes the published objects of `cap` match its spec and `vm`.
pub(super) async fn ensure_published(
    ctx: &Context,
    cap: &Capsule,
    ns: &str,
    node: Option<&str>,
    vm: Option<&Vm>,
) -> Result<(), Error> {
    let node_ip = node.and_then(|n| {
        ctx.nodes
            .get(&kube::runtime::reflector::ObjectRef::<Node>::new(n))
            .and_then(|n| internal_ip(&n))
    });
    // A placed capsule whose node's address is not known (the Node cache
    // not yet filled after a restart, or no InternalIP) keeps its objects
    // as they are rather than lose their endpoint for a moment.
    if node.is_some() && node_ip.is_none() {
        tracing::debug!(capsule = %cap.name_any(), "node address unknown; published objects left as they are");
        return Ok(());
    }
    let host_ports = vm.map(|v| v.host_ports.clone()).unwrap_or_default();
    let facts = PublishFacts {
        cap,
        node_ip: node_ip.as_deref(),
        node,
        running: vm.is_some_and(|v| v.state == VmState::Running),
        host_ports: &host_ports,
    };
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), ns);
    let name = cap.name_any();
    match build_published(&facts) {
        Some(p) => {
            ensure(&services, &name, &p.service, |a, b| {
                service_shape(a) == service_shape(b)
            })
            .await?;
            ensure(&slices, &slice_name(&name), &p.slice, |a, b| {
                slice_shape(a) == slice_shape(b)
            })
            .await
        }
        None => {
            // Objects exist only where ports were published, which the
            // status says; a capsule that never published costs no call.
            let was_published = cap
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == ConditionType::PortsPublished.as_str());
            let Some(uid) = cap.uid().filter(|_| was_published) else {
                return Ok(());
            };
            remove_owned(&slices, &slice_name(&name), &uid).await?;
            remove_owned(&services, &name, &uid).await
        }
    }
}

/// Applies `want` unless the object read back already matches it.
async fn ensure<K>(
    api: &Api<K>,
    name: &str,
    want: &K,
    same: impl Fn(&K, &K) -> bool,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let current = api.get_opt(name).await.map_err(|source| Error::Publish {
        action: "read",
        kind: kind.clone(),
        name: name.to_string(),
        source,
    })?;
    if current.as_ref().is_some_and(|c| same(c, want)) {
        return Ok(());
    }
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(want),
    )
    .await
    .map_err(|source| Error::Publish {
        action: "apply",
        kind,
        name: name.to_string(),
        source,
    })?;
    Ok(())
}

/// Deletes the object if the capsule owns it; leaves anyone else's alone.
async fn remove_owned<K>(api: &Api<K>, name: &str, uid: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let err = |action| {
        let kind = kind.clone();
        move |source| Error::Publish {
            action,
            kind,
            name: name.to_string(),
            source,
        }
    };
    let Some(current) = api.get_opt(name).await.map_err(err("read"))? else {
        return Ok(());
    };
    if !current.owner_references().iter().any(|o| o.uid == uid) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(err("delete")(e)),
    }
}
