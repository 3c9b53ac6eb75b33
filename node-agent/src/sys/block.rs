//! Kernel calls for `storage`.
