//! The typed ids the host modules take, built from a capsule's UID; a UID
//! they would refuse is an invalid spec. (The egress policy needs no such
//! step: its CIDRs are typed where they enter the agent.)

use super::model::Error;
use crate::network;
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
