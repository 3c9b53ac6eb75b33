//! Leader election: the `wrenn-operator` Lease in the operator's own
//! namespace. Only its holder reconciles; the chart's Role grants the verbs
//! on this one Lease name, so the name lives here once and tests take the
//! Lease exactly as the binary does.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};

/// Name of the Lease; the chart's Role names it in `resourceNames`.
pub const LEASE_NAME: &str = "wrenn-operator";

/// A manager for the Lease in `namespace`, held as `identity`. Building it
/// creates the Lease when absent. A holder renews every few seconds and a
/// standby takes over 15 s after the holder stops renewing.
pub async fn manager(
    client: Client,
    namespace: &str,
    identity: &str,
) -> kube_lease_manager::Result<LeaseManager> {
    LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
}
