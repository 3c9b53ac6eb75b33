//! The nfnetlink transport: nftables transactions, requests and dumps on
//! a netlink socket of the calling thread's namespace.
//!
//! Sockets are closed on a background thread. Closing a bound nfnetlink
//! socket makes the kernel wait for nf_tables' pending table destruction
//! (`nft_rcv_nl_event` flushes the destroy work, which waits for an RCU
//! grace period: 5–15 ms on this kind of node) whenever any namespace
//! dropped a table recently, as every capsule teardown does. A setup or
//! teardown has its answers by then; it need not wait for the close too.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc;

use netlink_packet_netfilter::nftables::NfTablesMessage;
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// An nfnetlink socket, closed on the closer thread when dropped. It
/// belongs to the namespace of the thread that opened it.
pub(super) struct Channel(Option<Socket>);

impl Drop for Channel {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            close_later(s);
        }
    }
}

/// Hands `s` to the closer thread; closes it here when there is none.
fn close_later(s: Socket) {
    static CLOSER: OnceLock<Option<mpsc::Sender<Socket>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Socket>();
        std::thread::Builder::new()
            .name("wrenn-nfnl-close".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = closer {
        // A send fails only once the thread is gone; the socket then
        // comes back in the error and is closed here.
        let _ = tx.send(s);
    }
}

impl Channel {
    pub(super) fn open() -> io::Result<Self> {
        let mut s = Socket::new(NETLINK_NETFILTER)?;
        s.bind_auto()?;
        s.connect(&SocketAddr::new(0, 0))?;
        Ok(Self(Some(s)))
    }

    fn socket(&self) -> io::Result<&Socket> {
        self.0
            .as_ref()
            .ok_or_else(|| io::Error::other("nfnetlink socket already closed"))
    }

    /// Sends one nftables transaction and waits for every part's answer.
    pub(super) fn transaction(
        &self,
        family: NetfilterProtoFamily,
        msgs: Vec<(NfTablesMessage, u16)>,
    ) -> io::Result<()> {
        let control = |m: ControlMessage, seq: u32| {
            let mut nl = NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                m,
            ));
            nl.header.flags = NLM_F_REQUEST;
            nl.header.sequence_number = seq;
            to_bytes(nl)
        };
        let mut buf = control(ControlMessage::BatchBegin, 0);
        let mut last = 0;
        for (i, (m, flags)) in msgs.into_iter().enumerate() {
            let seq = i as u32 + 1;
            let mut nl =
                NetlinkMessage::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), m));
            nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            nl.header.sequence_number = seq;
            buf.extend(to_bytes(nl));
            last = seq;
        }
        buf.extend(control(ControlMessage::BatchEnd, last + 1));
        let s = self.socket()?;
        s.send(&buf, 0)?;
        read_replies(s, |m| {
            Ok(m.header.sequence_number >= last && matches!(m.payload, NetlinkPayload::Error(_)))
        })
    }

    /// Sends `inner` as request 1 with `flags`; returns the socket to read
    /// the answer from.
    fn send_one(
        &self,
        family: NetfilterProtoFamily,
        inner: NetfilterMessageInner,
        flags: u16,
    ) -> io::Result<&Socket> {
        let mut nl = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            inner,
        ));
        nl.header.flags = NLM_F_REQUEST | flags;
        nl.header.sequence_number = 1;
        let s = self.socket()?;
        s.send(&to_bytes(nl), 0)?;
        Ok(s)
    }

    /// One request answered by an acknowledgement.
    pub(super) fn request(
        &self,
        family: NetfilterProtoFamily,
        inner: NetfilterMessageInner,
    ) -> io::Result<()> {
        let s = self.send_one(family, inner, NLM_F_ACK)?;
        read_replies(s, |m| Ok(matches!(m.payload, NetlinkPayload::Error(_))))
    }

    /// A dump request; returns every message of the answer.
    pub(super) fn dump(
        &self,
        family: NetfilterProtoFamily,
        inner: NetfilterMessageInner,
    ) -> io::Result<Vec<NetfilterMessage>> {
        let s = self.send_one(family, inner, NLM_F_DUMP)?;
        let mut out = Vec::new();
        read_replies(s, |m| match &m.payload {
            NetlinkPayload::InnerMessage(inner) => {
                out.push(inner.clone());
                Ok(false)
            }
            NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => Ok(true),
            _ => Ok(false),
        })?;
        Ok(out)
    }
}

fn to_bytes(mut m: NetlinkMessage<NetfilterMessage>) -> Vec<u8> {
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Reads replies until `done` says so; the first netlink error wins.
fn read_replies(
    s: &Socket,
    mut on: impl FnMut(&NetlinkMessage<NetfilterMessage>) -> io::Result<bool>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut first_err = None;
    loop {
        let n = s.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match &msg.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    first_err.get_or_insert_with(|| e.to_io());
                }
                _ => {}
            }
            if on(&msg)? {
                return first_err.map_or(Ok(()), Err);
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}
