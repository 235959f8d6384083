//! virtio-vsock driven as the guest's driver would, with real Unix sockets
//! on the host side (Firecracker's protocol): host-initiated and
//! guest-initiated connections carry data both ways under credit flow
//! control, and packets that break the protocol are answered with RST.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::*;
use virtio::vsock::packet::*;
use virtio::Vsock;
use vm_memory::{Bytes, GuestAddress};

const RXQ: usize = 0;
const TXQ: usize = 1;
const GUEST_CID: u64 = 3;
/// Receive buffers: 4 KiB each from here.
const RX_BUFS: u64 = BUFFERS;
const TX_BUF: u64 = BUFFERS + 0x10_0000;

struct Guest {
    d: Driver,
    next_rx: u64,
}

impl Guest {
    fn new(path: &std::path::Path) -> Guest {
        let vsock = Vsock::new(GUEST_CID, path, "vsock").unwrap();
        let mut d = Driver::new(Box::new(vsock));
        assert_eq!(d.read(0x08), 19, "vsock device");
        let mut cid = [0u8; 8];
        devices::bus::BusDevice::read(&mut d.transport, 0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        d.start();
        let mut g = Guest { d, next_rx: 0 };
        g.give_rx_buffers(8);
        g
    }

    fn give_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_BUFS + (self.next_rx % 64) * 0x1000;
            self.next_rx += 1;
            self.d.add_chain_on(RXQ, &[(addr, 0x1000, true)]);
        }
        self.d.kick(RXQ as u32);
    }

    /// The next packet the device put in a receive buffer.
    fn receive(&mut self) -> (Header, Vec<u8>) {
        let (head, len) = self.d.wait_used_on(RXQ);
        // Each buffer is a one-descriptor chain: find its address.
        let desc = DESC + QUEUE_STRIDE * RXQ as u64 + u64::from(head) * 16;
        let addr: u64 = self.d.memory.read_obj(GuestAddress(desc)).unwrap();
        let mut raw = [0u8; HEADER_LEN];
        self.d
            .memory
            .read_slice(&mut raw, GuestAddress(addr))
            .unwrap();
        let header = Header::parse(&raw);
        let mut payload = vec![0u8; len as usize - HEADER_LEN];
        self.d
            .memory
            .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        self.give_rx_buffers(1);
        (header, payload)
    }

    /// Sends a packet from guest port `src` to host port `dst`.
    fn send(&mut self, op: u16, src: u32, dst: u32, flags: u32, payload: &[u8]) {
        let header = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        self.send_raw(header, payload);
    }

    fn send_raw(&mut self, header: Header, payload: &[u8]) {
        self.d
            .memory
            .write_slice(&header.bytes(), GuestAddress(TX_BUF))
            .unwrap();
        self.d
            .memory
            .write_slice(payload, GuestAddress(TX_BUF + 0x100))
            .unwrap();
        let mut chain = vec![(TX_BUF, HEADER_LEN as u32, false)];
        if !payload.is_empty() {
            chain.push((TX_BUF + 0x100, payload.len() as u32, false));
        }
        self.d.add_chain_on(TXQ, &chain);
        self.d.kick(TXQ as u32);
        self.d.wait_used_on(TXQ);
    }
}

fn host_connect(path: &std::path::Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    s
}

#[test]
fn a_host_program_connects_to_a_guest_port_and_data_flows_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut g = Guest::new(&path);
    let mut host = host_connect(&path, 1024);
    // The guest sees a connection request from the host to its port 1024.
    let (req, _) = g.receive();
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (OP_REQUEST, HOST_CID, GUEST_CID, 1024)
    );
    let host_port = req.src_port;
    g.send(OP_RESPONSE, 1024, host_port, 0, &[]);
    let mut line = String::new();
    BufReader::new(&mut host).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    // Host to guest.
    host.write_all(b"hello guest").unwrap();
    let (rw, payload) = g.receive();
    assert_eq!((rw.op, rw.len), (OP_RW, 11));
    assert_eq!(payload, b"hello guest");
    // Guest to host.
    g.send(OP_RW, 1024, host_port, 0, b"hello host");
    let mut got = [0u8; 10];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    // The host closes: the guest is told it sends no more.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (shut, _) = g.receive();
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest closes both ways: RST ends it.
    g.send(
        OP_SHUTDOWN,
        1024,
        host_port,
        SHUTDOWN_SEND | SHUTDOWN_RCV,
        &[],
    );
    let (rst, _) = g.receive();
    assert_eq!(rst.op, OP_RST);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_guest_program_connects_to_a_host_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_52", path.display())).unwrap();
    let mut g = Guest::new(&path);
    g.send(OP_REQUEST, 5000, 52, 0, &[]);
    let (resp, _) = g.receive();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 52, 5000)
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.send(OP_RW, 5000, 52, 0, b"ping");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").unwrap();
    let (rw, payload) = g.receive();
    assert_eq!(rw.op, OP_RW);
    assert_eq!(payload, b"pong");
    // No listener on port 53: refused.
    g.send(OP_REQUEST, 5001, 53, 0, &[]);
    let (rst, _) = g.receive();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 5001));
}

#[test]
fn credit_holds_the_host_back_until_the_guest_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_60", path.display())).unwrap();
    let mut g = Guest::new(&path);
    // The guest announces room for 100 bytes only.
    let header = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 6000,
        dst_port: 60,
        len: 0,
        kind: TYPE_STREAM,
        op: OP_REQUEST,
        flags: 0,
        buf_alloc: 100,
        fwd_cnt: 0,
    };
    g.send_raw(header, &[]);
    assert_eq!(g.receive().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 300]).unwrap();
    let (rw, payload) = g.receive();
    assert_eq!(
        (rw.op, payload.len()),
        (OP_RW, 100),
        "no more than the credit"
    );
    // Nothing more until the guest says it consumed those 100 bytes.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.d.used_idx_on(RXQ), 2, "no packet past the credit");
    g.send_raw(
        Header {
            op: OP_CREDIT_UPDATE,
            fwd_cnt: 100,
            ..header
        },
        &[],
    );
    let (rw, payload) = g.receive();
    assert_eq!((rw.op, payload.len()), (OP_RW, 100));
}

#[test]
fn packets_that_break_the_protocol_get_rst_and_nothing_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut g = Guest::new(&path);
    // Data on a connection that does not exist.
    g.send(OP_RW, 7000, 70, 0, b"stray");
    assert_eq!(g.receive().0.op, OP_RST);
    // A wrong source CID, and a datagram type.
    let bad = Header {
        src_cid: 99,
        dst_cid: HOST_CID,
        src_port: 7001,
        dst_port: 70,
        len: 0,
        kind: TYPE_STREAM,
        op: OP_REQUEST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    g.send_raw(bad, &[]);
    assert_eq!(g.receive().0.op, OP_RST);
    g.send_raw(
        Header {
            src_cid: GUEST_CID,
            kind: 2,
            ..bad
        },
        &[],
    );
    assert_eq!(g.receive().0.op, OP_RST);
    // A header claiming more payload than the chain holds.
    g.send_raw(
        Header {
            src_cid: GUEST_CID,
            op: OP_RW,
            len: 1 << 30,
            ..bad
        },
        b"x",
    );
    assert_eq!(g.receive().0.op, OP_RST);
    // A chain shorter than a header: dropped, the device goes on.
    g.d.add_chain_on(TXQ, &[(TX_BUF, 10, false)]);
    g.d.kick(TXQ as u32);
    g.d.wait_used_on(TXQ);
    // A host client that never says CONNECT, or says nonsense, is dropped.
    let mut silent = UnixStream::connect(&path).unwrap();
    silent.write_all(b"HELLO\n").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(silent.read_to_end(&mut buf).unwrap(), 0);
    let mut long = UnixStream::connect(&path).unwrap();
    long.write_all(&[b'C'; 100]).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Closed with our bytes unread: end of file or a reset, never data.
    match long.read_to_end(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    // Still working: a guest connection succeeds.
    let listener = UnixListener::bind(format!("{}_71", path.display())).unwrap();
    g.send(OP_REQUEST, 7100, 71, 0, &[]);
    assert_eq!(g.receive().0.op, OP_RESPONSE);
    drop(listener);
}
