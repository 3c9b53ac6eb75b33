//! Linux implementations of the host traits: every syscall, ioctl, `setns`
//! and `unsafe` block of the node agent lives under here, each submodule
//! owned by the module whose trait it implements.

pub mod beneath;
pub mod block;
pub mod fd_passing;
pub mod net;
pub mod process;
pub mod rename;
mod tap;
pub mod xattr;
