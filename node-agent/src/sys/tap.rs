//! TAP devices through `/dev/net/tun`: the ioctls that make a persistent
//! TAP for a VMM to open by name, the only `unsafe` of the network code.
//! `sys::net` calls it inside the capsule's namespace.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::Path;

// TUNSETIFF and TUNSETPERSIST are `_IOW('T', n, int)`; TUNSETIFF's
// argument is really a `struct ifreq`, hence the `_bad` variants.
nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    tunsetpersist,
    nix::request_code_write!(b'T', 203, std::mem::size_of::<libc::c_int>())
);

pub(super) fn create_persistent(tun: &Path, name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let f = OpenOptions::new().read(true).write(true).open(tun)?;
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: `f` is an open tun clone device and `req` a valid, fully
    // initialised ifreq that outlives the call; the kernel only reads it
    // (and writes the name back within its bounds).
    unsafe { tunsetiff(f.as_raw_fd(), &req) }?;
    // SAFETY: `f` is now attached to the TAP; the argument is a plain int.
    unsafe { tunsetpersist(f.as_raw_fd(), 1) }?;
    // Closing `f` leaves the persistent TAP for the VMM to open by name.
    Ok(())
}
