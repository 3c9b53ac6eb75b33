//! Capsule root disks behind the `BlockStore` trait: device-mapper snapshots
//! over loop devices where the kernel has device-mapper, qcow2 overlays
//! elsewhere. Loop and dm ioctls go through `sys::block`.
