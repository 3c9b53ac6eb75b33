//! Tests of `sys::net` that need no privileges.

use super::*;

#[test]
fn sockets_in_the_own_namespace_are_made_on_the_calling_thread() {
    let here = std::thread::current().id();
    let (sock, made_on) = sockets_in_netns(Path::new("/proc/self/ns/net"), || {
        Ok((
            std::net::UdpSocket::bind("127.0.0.1:0")?,
            std::thread::current().id(),
        ))
    })
    .unwrap();
    assert_eq!(made_on, here);
    assert!(sock.local_addr().unwrap().ip().is_loopback());
    assert!(!is_own_netns(Path::new("/nonexistent/ns")));
}
