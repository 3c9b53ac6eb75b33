//! Capsule networking: per-capsule network namespace, veth pair, TAP, fixed
//! guest address with SNAT/DNAT to a per-slot host address, egress policy in
//! nftables, slot allocation. Netlink and nftables calls go through
//! `sys::net`; this module decides what to create and in which order.
