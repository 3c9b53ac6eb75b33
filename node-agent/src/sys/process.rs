//! Kernel calls for `vmm`.
