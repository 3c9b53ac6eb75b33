//! The only code that starts a VMM or talks to one: the typed Cloud
//! Hypervisor client over its API socket, event-monitor parsing, and (later)
//! the QEMU backend, behind one `Vmm` trait.
