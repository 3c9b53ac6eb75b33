//! The test "internet"'s DNS server, shared by the host tier
//! (`dns_egress.rs`) and the vm tier (`names_vm.rs`): fixed A records,
//! UDP and TCP, and a log of the names it was asked for (so a test can
//! tell that a refused name never went upstream).

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, QTYPE, RCODE, ResourceRecord, TYPE};

use super::in_ns;

/// TTL of every answer.
pub const TTL: u32 = 30;

/// The names a [`dns_server`] was asked for, in order, lowercase without
/// the root dot.
#[derive(Clone, Debug, Default)]
pub struct Asked(Arc<Mutex<Vec<String>>>);

impl Asked {
    /// Everything asked so far.
    pub fn names(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `name` was asked for.
    pub fn saw(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }

    fn push(&self, name: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(name);
    }
}

/// Serves DNS on `at` (port 53, UDP and TCP) inside `ns`: an A (or ANY)
/// query for a name in `records` gets its addresses with [`TTL`], another
/// type for such a name an empty answer, any other name NXDOMAIN. Runs on
/// threads until the process ends (its sockets die with the namespace).
pub fn dns_server(ns: &Path, at: Ipv4Addr, records: &'static [(&'static str, Ipv4Addr)]) -> Asked {
    let (sock, tcp) = in_ns(ns, move |_| {
        Ok((UdpSocket::bind((at, 53))?, TcpListener::bind((at, 53))?))
    })
    .expect("bind test DNS server");
    let asked = Asked::default();
    let log = asked.clone();
    let reply = move |query: &[u8]| -> Option<Vec<u8>> {
        let q = Packet::parse(query).ok()?;
        let mut r = Packet::new_reply(q.id());
        r.questions = q.questions.clone();
        let question = q.questions.first()?;
        let name = question.qname.to_string().to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name).to_string();
        log.push(name.clone());
        let wants_a = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
        let hits: Vec<_> = records.iter().filter(|(n, _)| *n == name).collect();
        if hits.is_empty() {
            *r.rcode_mut() = RCODE::NameError;
        }
        for (n, ip) in hits.into_iter().filter(|_| wants_a) {
            r.answers.push(ResourceRecord::new(
                Name::new_unchecked(n),
                CLASS::IN,
                TTL,
                RData::A(A::from(*ip)),
            ));
        }
        r.build_bytes_vec().ok()
    };
    let reply = Arc::new(reply);
    let udp_reply = reply.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(bytes) = udp_reply(&buf[..n]) {
                let _ = sock.send_to(&bytes, from);
            }
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        while let Ok((mut c, _)) = tcp.accept() {
            let mut len = [0u8; 2];
            if c.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if c.read_exact(&mut q).is_err() {
                continue;
            }
            if let Some(a) = reply(&q) {
                let _ = c.write_all(&(a.len() as u16).to_be_bytes());
                let _ = c.write_all(&a);
            }
        }
    });
    asked
}
