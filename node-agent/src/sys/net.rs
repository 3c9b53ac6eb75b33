//! Kernel calls for `network`.
