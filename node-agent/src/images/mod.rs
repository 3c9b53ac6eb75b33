//! Template root disks from OCI images: fetch or read a local layout,
//! unpack layers safely, inject `wrenn-guest`, write a sparse ext4 image,
//! cache it by manifest digest.
