//! The vsock I/O thread: guest packets in from the transmit queue, packets
//! out to the receive queue, and the Unix sockets of the host side.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ram::GuestRam;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::packet::*;
use crate::device::{Activation, Interrupt};
use crate::worker::StopSignal;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVENT: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// What each connection may hold of the guest's data before the host
/// reads it: the buffer space announced to the guest.
const BUF_ALLOC: u32 = 256 << 10;
/// Payload of one packet to the guest at most.
const MAX_PAYLOAD: usize = 64 << 10;
/// Connections at once; more are refused (RST).
const MAX_CONNECTIONS: usize = 1024;
/// The longest `CONNECT <port>\n` line read from a host client.
const MAX_CONNECT_LINE: usize = 32;
/// Packets sent to one connection per wake-up before others get a turn.
const BURST: usize = 16;
/// Host ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection: host port (local) and guest port (peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    local: u32,
    peer: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of the guest's data handed to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// The guest's data the host socket has not taken yet.
    to_host: VecDeque<u8>,
    /// The host closed its sending side.
    host_eof: bool,
    /// The guest will send no more: close the host's receiving side once
    /// `to_host` is out.
    guest_done_sending: bool,
    /// The interest registered with epoll.
    interest: EventSet,
}

impl Conn {
    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that has not yet said which guest port it wants.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A broken queue or ring: the device stops until the driver resets it.
struct QueueBroken(String);

fn broken(what: &str, e: impl std::fmt::Display) -> QueueBroken {
    QueueBroken(format!("{what}: {e}"))
}

pub(super) struct Muxer {
    memory: GuestRam,
    rx: Queue,
    tx: Queue,
    notify: [EventFd; 3],
    interrupt: Arc<Interrupt>,
    needs_reset: Arc<AtomicBool>,
    epoll: Epoll,
    cid: u64,
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    pending: HashMap<u64, Pending>,
    /// Packets without payload waiting for receive buffers.
    control: VecDeque<Header>,
    /// No receive buffer is free: stop reading host sockets until the
    /// driver adds some.
    rx_dry: bool,
    next_token: u64,
    next_local_port: u32,
    buffer: Vec<u8>,
}

impl Muxer {
    pub(super) fn new(
        mut activation: Activation,
        cid: u64,
        listener: UnixListener,
        path: PathBuf,
    ) -> io::Result<Muxer> {
        let mut queue = |i: usize| {
            activation
                .queues
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "virtio-vsock: the driver left a queue disabled",
                    )
                })
        };
        let (rx, tx, event) = (queue(RX)?, queue(TX)?, queue(EVENT)?);
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (rx.notify.as_raw_fd(), TOKEN_RX),
            (tx.notify.as_raw_fd(), TOKEN_TX),
            (event.notify.as_raw_fd(), TOKEN_EVENT),
            (listener.as_raw_fd(), TOKEN_LISTENER),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Muxer {
            memory: activation.memory,
            rx: rx.queue,
            tx: tx.queue,
            notify: [rx.notify, tx.notify, event.notify],
            interrupt: activation.interrupt,
            needs_reset: activation.needs_reset,
            epoll,
            cid,
            listener,
            path,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            rx_dry: false,
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            buffer: vec![0; MAX_PAYLOAD],
        })
    }

    pub(super) fn run(&mut self, stop: &StopSignal) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stop.event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        ) {
            tracing::error!("virtio-vsock: watching the stop event: {e}");
            return;
        }
        let mut events = vec![EpollEvent::default(); 64];
        self.step(TOKEN_TX, EventSet::IN, stop);
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: waiting for events: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == TOKEN_STOP || stop.requested() {
                    return;
                }
                self.step(event.data(), event.event_set(), stop);
            }
        }
    }

    /// What the thread does after notifications of the transmit and the
    /// receive queue.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn serve_notified_queues(&mut self, stop: &StopSignal) {
        self.step(TOKEN_TX, EventSet::IN, stop);
        self.step(TOKEN_RX, EventSet::IN, stop);
    }

    fn step(&mut self, token: u64, events: EventSet, stop: &StopSignal) {
        // Consume a notification first: a level-triggered eventfd left set
        // would wake the thread forever.
        match token {
            TOKEN_TX => drop(self.notify[TX].read()),
            TOKEN_RX => drop(self.notify[RX].read()),
            TOKEN_EVENT => drop(self.notify[EVENT].read()),
            _ => {}
        }
        if self.needs_reset.load(Ordering::SeqCst) {
            return;
        }
        let result = match token {
            TOKEN_TX => self.transmit(stop),
            TOKEN_RX => {
                self.rx_dry = false;
                self.refresh_interests();
                Ok(())
            }
            // The event queue only ever carries transport resets, which
            // vessel never sends; its buffers stay queued.
            TOKEN_EVENT => Ok(()),
            TOKEN_LISTENER => {
                self.accept();
                Ok(())
            }
            t => {
                if self.pending.contains_key(&t) {
                    self.read_connect_line(t);
                    Ok(())
                } else if let Some(key) = self.by_token.get(&t).copied() {
                    if events.contains(EventSet::OUT) {
                        self.flush_to_host(key);
                    }
                    if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        self.host_to_guest(key)
                    } else {
                        Ok(())
                    }
                } else {
                    Ok(())
                }
            }
        };
        let result = result.and_then(|()| self.deliver_control());
        if let Err(QueueBroken(why)) = result {
            tracing::warn!("virtio-vsock: {why}; the device needs a reset");
            self.needs_reset.store(true, Ordering::SeqCst);
            // Nothing is served until the driver resets the device: every
            // connection ends, and nothing but the stop is watched.
            let keys: Vec<Key> = self.conns.keys().copied().collect();
            for key in keys {
                self.remove_conn(key);
            }
            for p in self.pending.values() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.pending.clear();
            let mut fds: Vec<i32> = self.notify.iter().map(|n| n.as_raw_fd()).collect();
            fds.push(self.listener.as_raw_fd());
            for fd in fds {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- the host side -------------------------------------------------

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: the host sees the connection close
                    }
                    let token = self.new_token();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            stream.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, token),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            token,
                            Pending {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("virtio-vsock: accepting: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` and asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: whatever follows the line is the connection's
        // data and must stay in the socket.
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    let line = String::from_utf8_lossy(&p.line).into_owned();
                    break line
                        .strip_prefix("CONNECT ")
                        .and_then(|n| n.trim().parse::<u32>().ok());
                }
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EOF, a line too long, or an error: forget the client.
                _ => break None,
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            return; // closing the stream tells the client
        };
        let local = self.free_local_port(port);
        let key = Key { local, peer: port };
        self.add_conn(key, p.stream, State::Connecting);
        self.send_control(key, OP_REQUEST, 0);
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let local = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key { local, peer }) {
                return local;
            }
        }
    }

    fn add_conn(&mut self, key: Key, stream: UnixStream, state: State) {
        let token = self.new_token();
        let conn = Conn {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            host_eof: false,
            guest_done_sending: false,
            interest: EventSet::empty(),
        };
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                conn.stream.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), token),
            )
            .is_err()
        {
            return;
        }
        self.by_token.insert(token, key);
        self.conns.insert(key, conn);
        self.update_interest(key);
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_token.remove(&conn.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Ends a connection and tells the guest.
    fn reset_conn(&mut self, key: Key) {
        self.remove_conn(key);
        self.send_control(key, OP_RST, 0);
    }

    /// Watch the host socket for data only while the guest can take it,
    /// and for room only while data waits for it.
    fn update_interest(&mut self, key: Key) {
        let rx_dry = self.rx_dry;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if conn.state == State::Established && !conn.host_eof && !rx_dry && conn.peer_credit() > 0 {
            want |= EventSet::IN;
        }
        if !conn.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if want != conn.interest
            && self
                .epoll
                .ctl(
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(want, conn.token),
                )
                .is_ok()
        {
            conn.interest = want;
        }
    }

    fn refresh_interests(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.update_interest(key);
        }
    }

    /// Writes what the guest sent to the host socket, as far as it takes.
    fn flush_to_host(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match conn.stream.write(front) {
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // The host went away: so does the connection.
            self.reset_conn(key);
            return;
        }
        if conn.to_host.is_empty() && conn.guest_done_sending {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about the room made, before it has to ask.
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
        self.update_interest(key);
    }

    /// Moves the host's data to the guest while it has credit and buffers.
    fn host_to_guest(&mut self, key: Key) -> Result<(), QueueBroken> {
        for _ in 0..BURST {
            let Some(conn) = self.conns.get(&key) else {
                return Ok(());
            };
            if conn.state != State::Established || conn.host_eof {
                break;
            }
            let credit = conn.peer_credit() as usize;
            if credit == 0 || self.rx_dry {
                break;
            }
            let memory = &self.memory;
            let Some(chain) = self
                .rx
                .iter(memory)
                .map_err(|e| broken("receive ring", e))?
                .next()
            else {
                self.rx_ran_dry()?;
                break;
            };
            let head = chain.head_index();
            let mut writer = Writer::new(memory, chain).map_err(|e| broken("receive buffer", e))?;
            let room = writer.available_bytes().saturating_sub(HEADER_LEN);
            let want = room.min(credit).min(MAX_PAYLOAD);
            if want == 0 {
                // A buffer with no room for data: skip it.
                self.rx
                    .add_used(memory, head, 0)
                    .map_err(|e| broken("receive used ring", e))?;
                continue;
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                return Ok(());
            };
            let n = match conn.stream.read(&mut self.buffer[..want]) {
                Ok(0) => {
                    // The host is done sending: tell the guest, keep the
                    // other direction. The buffer goes back unused.
                    conn.host_eof = true;
                    self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                    self.send_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                    break;
                }
                Ok(n) => n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                    break;
                }
                Err(_) => {
                    self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                    self.reset_conn(key);
                    return Ok(());
                }
            };
            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
            let mut header = header(self.cid, key, Some(conn), OP_RW, 0);
            header.len = n as u32;
            writer
                .write_all(&header.bytes())
                .and_then(|()| writer.write_all(&self.buffer[..n]))
                .map_err(|e| broken("writing a packet", e))?;
            self.rx
                .add_used(memory, head, (HEADER_LEN + n) as u32)
                .map_err(|e| broken("receive used ring", e))?;
            self.signal_rx()?;
        }
        self.update_interest(key);
        Ok(())
    }

    /// Queues a packet without payload for the guest on connection `key`.
    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        let header = header(self.cid, key, self.conns.get_mut(&key), op, flags);
        self.control.push_back(header);
    }

    // ---- the guest side ------------------------------------------------

    fn rx_ran_dry(&mut self) -> Result<(), QueueBroken> {
        self.rx_dry = true;
        // Ask for a kick when the driver adds buffers; if it already has,
        // carry on.
        if self
            .rx
            .enable_notification(&self.memory)
            .map_err(|e| broken("receive queue", e))?
        {
            self.rx_dry = false;
        }
        self.refresh_interests();
        Ok(())
    }

    fn signal_rx(&mut self) -> Result<(), QueueBroken> {
        if self
            .rx
            .needs_notification(&self.memory)
            .map_err(|e| broken("receive queue", e))?
        {
            let _ = self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Sends the queued control packets while receive buffers last.
    fn deliver_control(&mut self) -> Result<(), QueueBroken> {
        while !self.control.is_empty() && !self.rx_dry {
            let memory = &self.memory;
            let Some(chain) = self
                .rx
                .iter(memory)
                .map_err(|e| broken("receive ring", e))?
                .next()
            else {
                return self.rx_ran_dry();
            };
            let head = chain.head_index();
            let mut writer = Writer::new(memory, chain).map_err(|e| broken("receive buffer", e))?;
            let used = match self.control.pop_front() {
                Some(header) if writer.available_bytes() >= HEADER_LEN => {
                    writer
                        .write_all(&header.bytes())
                        .map_err(|e| broken("writing a packet", e))?;
                    HEADER_LEN as u32
                }
                // A buffer too small for a header takes nothing.
                _ => 0,
            };
            self.rx
                .add_used(memory, head, used)
                .map_err(|e| broken("receive used ring", e))?;
            self.signal_rx()?;
        }
        Ok(())
    }

    /// Takes every packet the guest queued.
    fn transmit(&mut self, stop: &StopSignal) -> Result<(), QueueBroken> {
        let mut returned = 0;
        loop {
            self.tx
                .disable_notification(&self.memory)
                .map_err(|e| broken("transmit queue", e))?;
            loop {
                if stop.requested() {
                    return Ok(());
                }
                let memory = &self.memory;
                let Some(chain) = self
                    .tx
                    .iter(memory)
                    .map_err(|e| broken("transmit ring", e))?
                    .next()
                else {
                    break;
                };
                let head = chain.head_index();
                let mut reader =
                    Reader::new(memory, chain).map_err(|e| broken("transmit buffer", e))?;
                let mut raw = [0u8; HEADER_LEN];
                let packet = match reader.read_exact(&mut raw) {
                    Ok(()) => Some(Header::parse(&raw)),
                    Err(_) => None,
                };
                if let Some(header) = packet {
                    let len = (header.len as usize).min(reader.available_bytes());
                    if len <= self.buffer.len() && len == header.len as usize {
                        let payload = &mut self.buffer[..len];
                        if reader.read_exact(payload).is_ok() {
                            self.packet_from_guest(header, len);
                        }
                    } else {
                        // A payload longer than it may be, or missing.
                        self.refuse(header);
                    }
                }
                self.tx
                    .add_used(&self.memory, head, 0)
                    .map_err(|e| broken("transmit used ring", e))?;
                returned += 1;
            }
            if !self
                .tx
                .enable_notification(&self.memory)
                .map_err(|e| broken("transmit queue", e))?
            {
                break;
            }
        }
        if returned > 0
            && self
                .tx
                .needs_notification(&self.memory)
                .map_err(|e| broken("transmit queue", e))?
        {
            let _ = self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Answers a packet that fits no connection with RST (never an RST
    /// with an RST).
    fn refuse(&mut self, packet: Header) {
        if packet.op == OP_RST {
            return;
        }
        let key = Key {
            local: packet.dst_port,
            peer: packet.src_port,
        };
        self.remove_conn(key);
        self.send_control(key, OP_RST, 0);
    }

    /// One packet from the guest, its payload in `self.buffer[..len]`.
    fn packet_from_guest(&mut self, packet: Header, len: usize) {
        if packet.src_cid != self.cid || packet.dst_cid != HOST_CID || packet.kind != TYPE_STREAM {
            return self.refuse(packet);
        }
        let key = Key {
            local: packet.dst_port,
            peer: packet.src_port,
        };
        if packet.op == OP_REQUEST {
            return self.guest_connects(key, packet);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return self.refuse(packet);
        };
        // Every packet carries the guest's credit.
        conn.peer_buf_alloc = packet.buf_alloc;
        conn.peer_fwd_cnt = packet.fwd_cnt;
        match packet.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let reply = format!("OK {}\n", key.local);
                // A fresh socket takes a few bytes at once; a host client
                // that cannot is gone.
                if conn.stream.write_all(reply.as_bytes()).is_err() {
                    return self.reset_conn(key);
                }
            }
            OP_RW if conn.state == State::Established => {
                // The guest may not send more than announced room.
                let held = conn.to_host.len() + len;
                if held > BUF_ALLOC as usize || conn.guest_done_sending {
                    return self.reset_conn(key);
                }
                conn.to_host.extend(&self.buffer[..len]);
                self.flush_to_host(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                self.send_control(key, OP_CREDIT_UPDATE, 0);
            }
            OP_SHUTDOWN => {
                if packet.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if packet.flags & SHUTDOWN_RCV != 0 {
                    conn.host_eof = true; // nothing more goes to the guest
                }
                let both = SHUTDOWN_SEND | SHUTDOWN_RCV;
                if packet.flags & both == both {
                    // Closed both ways: hand over what is left, then end
                    // the connection (the guest waits for our RST).
                    self.flush_to_host(key);
                    return self.reset_conn(key);
                }
                self.flush_to_host(key);
            }
            OP_RST => return self.remove_conn(key),
            _ => return self.reset_conn(key),
        }
        self.update_interest(key);
    }

    /// A guest program connects to host port `key.local`: the Unix socket
    /// `PATH_<port>`.
    fn guest_connects(&mut self, key: Key, request: Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.send_control(key, OP_RST, 0);
            return;
        }
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{}", key.local));
        match UnixStream::connect(&path) {
            Ok(stream) if stream.set_nonblocking(true).is_ok() => {
                self.add_conn(key, stream, State::Established);
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.peer_buf_alloc = request.buf_alloc;
                    conn.peer_fwd_cnt = request.fwd_cnt;
                }
                self.update_interest(key);
                self.send_control(key, OP_RESPONSE, 0);
            }
            _ => self.send_control(key, OP_RST, 0),
        }
    }
}

/// The header of a packet to the guest (CID `cid`) on connection `key`,
/// with this side's credit from `conn` (which records it as told).
fn header(cid: u64, key: Key, conn: Option<&mut Conn>, op: u16, flags: u32) -> Header {
    let fwd_cnt = match conn {
        Some(conn) => {
            conn.fwd_cnt_sent = conn.fwd_cnt;
            conn.fwd_cnt
        }
        None => 0,
    };
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: key.local,
        dst_port: key.peer,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt,
    }
}
