//! The typed ids and policy the host modules take, built from a capsule's
//! UID and spec; a UID or CIDR they would refuse is an invalid spec.

use super::model::{Egress, Error};
use crate::network::{self, EgressPolicy};
use crate::storage;

pub(crate) fn net_id(uid: &str) -> Result<network::CapsuleId, Error> {
    network::CapsuleId::new(uid).map_err(|e| Error::InvalidSpec {
        reason: e.to_string(),
    })
}

pub(crate) fn disk_id(uid: &str) -> Result<storage::CapsuleId, Error> {
    storage::CapsuleId::new(uid).map_err(|e| Error::InvalidSpec {
        reason: e.to_string(),
    })
}

pub(crate) fn policy(egress: &Egress) -> Result<EgressPolicy, Error> {
    Ok(match egress {
        Egress::Allow => EgressPolicy::Allow,
        Egress::Deny => EgressPolicy::Deny,
        Egress::AllowList(cidrs) => EgressPolicy::AllowList(
            cidrs
                .iter()
                .map(|c| {
                    c.parse()
                        .map_err(|e: network::ParseCidrError| Error::InvalidSpec {
                            reason: format!("egress CIDR {c:?}: {e}"),
                        })
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}
