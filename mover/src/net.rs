//! QUIC endpoints tuned for bulk transfer: transport settings, UDP sockets and connecting.
//!
//! Agents listen with [`server_endpoint`]; whoever dials (the controller, or an agent pushing
//! to another) uses [`client_endpoint`] and [`connect`]. TLS settings come from `tls`.

use std::io::{ErrorKind, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

/// Largest UDP payload we accept, and send to a peer on this host (see
/// [`loopback_transport_config`]).
const MAX_UDP_PAYLOAD: u16 = 65_000;

/// Largest UDP payload MTU discovery tries on other paths: what the path carries (1452 on
/// plain Ethernet) up to this. quinn hands the kernel up to 10 packets at once as one
/// segmented send (GSO), and one send cannot exceed 64 KiB: with larger packets every such
/// send failed, the losses looked like an MTU black hole, and quinn fell back to 1,200-byte
/// packets for a minute. Jumbo-frame paths (8952) run at this size instead.
const MAX_GSO_PAYLOAD: u16 = 6_500;

/// UDP socket buffers we ask the kernel for; the defaults (~200 KiB) drop packets at
/// multi-gigabit rates.
const SOCKET_BUFFER: usize = 8 << 20;

/// Flow-control window per connection, both directions (see [`transport_config`]).
pub const WINDOW: u32 = 16 << 20;

/// What the windows of one hop's connections may add up to, in each direction: with many
/// connections each gets a share (see [`window_for`]), so that memory does not grow with them.
pub const WINDOW_BUDGET: u32 = 48 << 20;

/// The smallest window a connection is given, however many there are.
const MIN_WINDOW: u32 = 2 << 20;

/// The flow-control window of each of a hop's `connections`: [`WINDOW`], or an equal share
/// of [`WINDOW_BUDGET`] when that is smaller (never below 2 MiB). Applied to each connection
/// once the hop's connection count is known: the send window where a hop dials its child,
/// the receive window where the child takes the data streams.
pub fn window_for(connections: usize) -> u32 {
    let share = WINDOW_BUDGET / u32::try_from(connections.max(1)).unwrap_or(u32::MAX);
    share.clamp(MIN_WINDOW, WINDOW)
}

/// How long a silent peer is given before its connection is dropped (documented in the
/// README).
pub const IDLE_TIMEOUT_MS: u32 = 15_000;

/// How long [`connect`] waits for the handshake. Shorter than the idle timeout so a dead or
/// filtered address is reported quickly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "bind udp socket to {addr}: the address is already in use (is another agent running?)"
    )]
    AddrInUse { addr: SocketAddr },
    #[error("{op} for {addr}: {source}")]
    Socket {
        op: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to node {node} at {addr}: {source}")]
    Connect {
        node: String,
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connect to node {node} at {addr}: {source}")]
    Handshake {
        node: String,
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error(
        "connect to node {node} at {addr}: no answer within {}s (is the agent running and \
         the UDP port open?)",
        after.as_secs()
    )]
    HandshakeTimeout {
        node: String,
        addr: SocketAddr,
        after: Duration,
    },
}

impl NetError {
    /// Whether trying again later can help (the peer may come up or the network recover);
    /// false for errors that need a fix, such as a rejected certificate.
    pub fn is_retryable(&self) -> bool {
        match self {
            NetError::HandshakeTimeout { .. } => true,
            NetError::Handshake { source, .. } => matches!(
                source,
                quinn::ConnectionError::TimedOut
                    | quinn::ConnectionError::Reset
                    | quinn::ConnectionError::CidsExhausted
            ),
            NetError::AddrInUse { .. } | NetError::Socket { .. } | NetError::Connect { .. } => {
                false
            }
        }
    }
}

/// Transport settings for moving large files over fast networks.
pub fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    // Windows bound memory: each connection may hold this much unread (receiver) or unacked
    // (sender) data, and a hop has one connection per core. 16 MiB covers 1 Gbit/s at 100 ms
    // or 10 Gbit/s at 10 ms per connection; quinn's 1.25 MB default caps a stream near
    // 100 Mbit/s at 100 ms. Hops with many connections lower each one's (`window_for`).
    config.stream_receive_window(VarInt::from_u32(WINDOW));
    config.receive_window(VarInt::from_u32(WINDOW));
    config.send_window(u64::from(WINDOW));
    // Fewer than the default 100: data streams are few and large, and each costs state.
    config.max_concurrent_uni_streams(VarInt::from_u32(64));
    config.max_concurrent_bidi_streams(VarInt::from_u32(16));
    // Default is none; keep firewall/NAT state alive while a peer is busy with its disk.
    config.keep_alive_interval(Some(Duration::from_secs(2)));
    // Default 30 s. A peer that vanishes (killed, unplugged) is noticed after this long; a
    // clean shutdown is noticed at once. Short, so a dead hop does not hold up the chain.
    config.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(IDLE_TIMEOUT_MS))));
    // Default upper bound 1452 would keep jumbo-frame LANs at small packets.
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_GSO_PAYLOAD);
    config.mtu_discovery_config(Some(mtu));
    // Default 333 ms is for the internet; on a LAN it makes early loss recovery very slow.
    config.initial_rtt(Duration::from_millis(10));
    config
}

/// Transport settings for dialing a peer on this very host, if loopback's MTU is known: its
/// largest datagrams (up to [`MAX_UDP_PAYLOAD`]) from the first packet on, one per send
/// (segmented sends of them would pass the 64 KiB limit of one send). A tenth of the packets
/// of [`transport_config`]'s for the same bytes, and the CPU each packet costs at both ends.
pub fn loopback_transport_config() -> Option<TransportConfig> {
    let mtu: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Room for an IPv6 and a UDP header (more than IPv4 needs).
    let payload = u16::try_from(mtu.saturating_sub(48))
        .unwrap_or(u16::MAX)
        .min(MAX_UDP_PAYLOAD);
    if payload <= MAX_GSO_PAYLOAD {
        return None;
    }
    let mut config = transport_config();
    let mut discovery = MtuDiscoveryConfig::default();
    discovery.upper_bound(payload);
    // Loss here is a receiver that fell behind, not a path that shrank: should quinn take it
    // for an MTU black hole, it goes back up soon.
    discovery.black_hole_cooldown(Duration::from_secs(1));
    // quinn's first congestion window (14,720 bytes) would not hold one such datagram, and
    // nothing would ever be sent.
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(16 * u64::from(payload));
    config
        .initial_mtu(payload)
        .mtu_discovery_config(Some(discovery))
        .enable_segmentation_offload(false)
        .congestion_controller_factory(Arc::new(cubic));
    Some(config)
}

/// An endpoint that accepts connections on `addr`. Must be called inside a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, NetError> {
    let socket = udp_socket(addr)?;
    endpoint(socket, Some(config)).map_err(|source| NetError::Socket {
        op: "start quic endpoint",
        addr,
        source,
    })
}

/// An endpoint bound to `bind` that dials out with `config`. Must be called inside a tokio
/// runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, NetError> {
    let socket = udp_socket(bind)?;
    let mut endpoint = endpoint(socket, None).map_err(|source| NetError::Socket {
        op: "start quic endpoint",
        addr: bind,
        source,
    })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    use quinn::Runtime;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(Batched::new(runtime.wrap_udp_socket(socket)?));
    quinn::Endpoint::new_with_abstract_socket(endpoint_config(), server, socket, runtime)
}

/// About how many bytes one receive call may take.
const RECV_BYTES: usize = 256 << 10;

/// A UDP socket that hands quinn about [`RECV_BYTES`] per receive call. quinn asks for up to
/// 32 datagrams at once, and copies each out of its receive buffer before their connection
/// decrypts any of them: with 64 KB datagrams (loopback) that is 2 MB received and 2 MB
/// copied, more than a core's L2 cache, so the decryption, and the copy of the plaintext
/// into the frame buffer after it, read the data back from memory. With a quarter of a MiB
/// per call, the connection decrypts what was just copied. Small datagrams (1,452 bytes on
/// Ethernet) still come 32 at a time, so the number of system calls does not grow.
#[derive(Debug)]
struct Batched {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// Datagrams the next call may take: [`RECV_BYTES`] over the last call's average size.
    per_call: AtomicUsize,
}

impl Batched {
    fn new(inner: Arc<dyn quinn::AsyncUdpSocket>) -> Self {
        Self {
            inner,
            per_call: AtomicUsize::new(usize::MAX),
        }
    }
}

impl quinn::AsyncUdpSocket for Batched {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        let n = bufs
            .len()
            .min(meta.len())
            .min(self.per_call.load(Ordering::Relaxed));
        let polled = self.inner.poll_recv(cx, &mut bufs[..n], &mut meta[..n]);
        if let Poll::Ready(Ok(got)) = polled {
            let bytes: usize = meta[..got.min(n)].iter().map(|m| m.len).sum();
            if let Some(avg) = bytes.checked_div(got).filter(|&a| a > 0) {
                self.per_call
                    .store((RECV_BYTES / avg).max(1), Ordering::Relaxed);
            }
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// How long a controller lingers after closing a connection, so that the close goes out
/// before the process exits. Waiting for the whole draining period (three probe timeouts: about
/// 80 ms on loopback, more across a WAN) only serves to answer a peer that is still sending,
/// and the agent has said everything it had to by then.
const CLOSE_LINGER: Duration = Duration::from_millis(10);

/// Closes a controller's connection to an agent once the agent's last answer is in (or will
/// not come), lingering [`CLOSE_LINGER`] for the close to leave.
pub async fn close_done(endpoint: &quinn::Endpoint, conn: &quinn::Connection) {
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
}

/// Connects to the agent `node` at `addr`; the handshake fails unless the server's certificate
/// names `node`. A loopback `addr` is dialed with `loopback` where given (see
/// [`loopback_transport_config`]).
pub async fn connect(
    endpoint: &quinn::Endpoint,
    loopback: Option<&quinn::ClientConfig>,
    addr: SocketAddr,
    node: &str,
) -> Result<quinn::Connection, NetError> {
    let connecting = match loopback.filter(|_| addr.ip().is_loopback()) {
        Some(config) => endpoint.connect_with(config.clone(), addr, node),
        None => endpoint.connect(addr, node),
    }
    .map_err(|source| NetError::Connect {
        node: node.to_owned(),
        addr,
        source,
    })?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(NetError::Handshake {
            node: node.to_owned(),
            addr,
            source,
        }),
        Err(_) => Err(NetError::HandshakeTimeout {
            node: node.to_owned(),
            addr,
            after: HANDSHAKE_TIMEOUT,
        }),
    }
}

fn endpoint_config() -> EndpointConfig {
    let mut config = EndpointConfig::default();
    // Accept the large packets MTU discovery may find; the default (1472) would cap it. quinn
    // reserves receive buffers of this size, but the kernel only fills what arrives.
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is within quinn's bounds");
    config
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, NetError> {
    let socket_error = |op| move |source| NetError::Socket { op, addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(socket_error("create udp socket"))?;
    grow_buffers(&socket, addr);
    socket.bind(&addr.into()).map_err(|source| {
        if source.kind() == ErrorKind::AddrInUse {
            NetError::AddrInUse { addr }
        } else {
            NetError::Socket {
                op: "bind udp socket",
                addr,
                source,
            }
        }
    })?;
    // tokio requires a non-blocking socket.
    socket
        .set_nonblocking(true)
        .map_err(socket_error("make udp socket non-blocking"))?;
    Ok(socket.into())
}

/// Asks for [`SOCKET_BUFFER`]-sized buffers; the kernel may cap them, which costs speed only.
fn grow_buffers(socket: &Socket, addr: SocketAddr) {
    // Errors are ignored: a smaller buffer still works, and the sizes are checked below.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    #[cfg(target_os = "linux")]
    {
        // As root, the *FORCE options exceed net.core.{r,w}mem_max.
        if socket.recv_buffer_size().is_ok_and(|n| n < SOCKET_BUFFER) {
            let _ = force_buffer_size(socket, libc::SO_RCVBUFFORCE);
        }
        if socket.send_buffer_size().is_ok_and(|n| n < SOCKET_BUFFER) {
            let _ = force_buffer_size(socket, libc::SO_SNDBUFFORCE);
        }
    }
    let recv = socket.recv_buffer_size().unwrap_or(0);
    let send = socket.send_buffer_size().unwrap_or(0);
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        tracing::warn!(
            %addr,
            recv,
            send,
            wanted = SOCKET_BUFFER,
            "udp socket buffers are smaller than wanted; transfers may be slower; raise \
             net.core.rmem_max and net.core.wmem_max to fix"
        );
    }
}

#[cfg(target_os = "linux")]
fn force_buffer_size(socket: &Socket, option: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd belongs to `socket`, which outlives the call; the value is a c_int and its
    // exact size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::time::timeout;

    use super::*;
    use crate::certs;
    use crate::tls::{self, Identity, Peer, TlsPaths};

    /// Upper bound of every wait in these tests.
    const WAIT: Duration = Duration::from_secs(10);

    /// Sends `count` datagrams of `len` bytes to `to`, then receives through `socket` once
    /// with room for 32: how many came in that call.
    async fn one_receive(socket: &Batched, to: SocketAddr, count: usize, len: usize) -> usize {
        let tx = std::net::UdpSocket::bind(loopback()).expect("bind a sender");
        for _ in 0..count {
            tx.send_to(&vec![1u8; len], to).expect("send a datagram");
        }
        let got = receive(socket).await;
        // Drain the rest, so that the next round starts empty.
        let mut left = count - got;
        while left > 0 {
            left -= receive(socket).await;
        }
        got
    }

    /// One receive call through `socket`, with room for 32 datagrams.
    async fn receive(socket: &Batched) -> usize {
        let mut storage = vec![vec![0u8; 65_536]; 32];
        let mut meta = [quinn::udp::RecvMeta::default(); 32];
        let polled = std::future::poll_fn(|cx| {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            quinn::AsyncUdpSocket::poll_recv(socket, cx, &mut bufs, &mut meta)
        });
        timeout(WAIT, polled)
            .await
            .expect("datagrams arrive")
            .expect("receive")
    }

    #[tokio::test]
    async fn large_datagrams_are_received_a_quarter_mib_at_a_time_and_small_ones_32() {
        use quinn::Runtime;
        let std_socket = udp_socket(loopback()).expect("bind");
        let room = Socket::from(std_socket.try_clone().expect("clone the socket"))
            .recv_buffer_size()
            .expect("receive buffer size");
        if room < 2 << 20 {
            eprintln!(
                "SKIPPED: this socket's receive buffer is {room} bytes, too small to queue the \
                 test's datagrams (run as root, or raise net.core.rmem_max to 8 MiB)"
            );
            return;
        }
        let to = std_socket.local_addr().expect("address");
        let socket = Batched::new(
            quinn::TokioRuntime
                .wrap_udp_socket(std_socket)
                .expect("wrap the socket"),
        );
        // Nothing learned yet: as many as quinn asks for.
        assert_eq!(one_receive(&socket, to, 12, 60_000).await, 12);
        // 60 KB datagrams: four of them make about a quarter of a MiB.
        assert_eq!(one_receive(&socket, to, 12, 60_000).await, 4);
        // After small datagrams come, a call takes up to quinn's 32 again (the size learned
        // from the first small call, which still took at most four).
        one_receive(&socket, to, 40, 1_200).await;
        assert_eq!(one_receive(&socket, to, 40, 1_200).await, 32);
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn cluster(nodes: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        certs::init(dir.path(), &nodes).expect("init certs");
        dir
    }

    fn paths(dir: &Path, stem: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    fn listener(paths: &TlsPaths) -> quinn::Endpoint {
        let id = Identity::load(paths).expect("load server identity");
        let config = tls::server_config(&id, Arc::new(transport_config())).expect("server config");
        server_endpoint(loopback(), config).expect("server endpoint")
    }

    fn dialer(paths: &TlsPaths) -> quinn::Endpoint {
        let id = Identity::load(paths).expect("load client identity");
        let config = tls::client_config(&id, Arc::new(transport_config())).expect("client config");
        client_endpoint(loopback(), config).expect("client endpoint")
    }

    /// Accepts one connection and returns the handshake's result with the peer it names.
    fn accept_one(
        server: &quinn::Endpoint,
    ) -> tokio::task::JoinHandle<Option<Result<(quinn::Connection, Peer), String>>> {
        let server = server.clone();
        tokio::spawn(async move {
            let incoming = server.accept().await?;
            Some(match incoming.await {
                Ok(conn) => match tls::peer_of(&conn) {
                    Ok(peer) => Ok((conn, peer)),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            })
        })
    }

    /// A controller connected to east1 of a new cluster: the cluster's directory (keep it for
    /// the connection's life), the controller's side and east1's.
    async fn controller_to_east1() -> (tempfile::TempDir, quinn::Connection, quinn::Connection) {
        let dir = cluster(&["east1"]);
        let client = dialer(&paths(dir.path(), "controller"));
        let (conn, server_conn) = to_east1(dir.path(), &client, None).await;
        (dir, conn, server_conn)
    }

    /// `client` connected (with `loopback` as [`connect`] says) to a new listener for east1 of
    /// the cluster in `dir`: both ends.
    async fn to_east1(
        dir: &Path,
        client: &quinn::Endpoint,
        loopback: Option<&quinn::ClientConfig>,
    ) -> (quinn::Connection, quinn::Connection) {
        let server = listener(&paths(dir, "east1"));
        let addr = server.local_addr().expect("server addr");
        let accepted = accept_one(&server);
        let conn = timeout(WAIT, connect(client, loopback, addr, "east1"))
            .await
            .expect("connect in time")
            .expect("handshake succeeds");
        let (server_conn, _) = timeout(WAIT, accepted)
            .await
            .expect("accept in time")
            .expect("accept task")
            .expect("an incoming connection")
            .expect("server handshake succeeds");
        (conn, server_conn)
    }

    #[tokio::test]
    async fn controller_and_node_see_each_other() {
        let dir = cluster(&["east1", "east2"]);
        let server = listener(&paths(dir.path(), "east1"));
        let addr = server.local_addr().expect("server addr");
        let client = dialer(&paths(dir.path(), "controller"));
        let accepted = accept_one(&server);

        let conn = timeout(WAIT, connect(&client, None, addr, "east1"))
            .await
            .expect("connect in time")
            .expect("handshake succeeds");
        assert_eq!(
            tls::peer_of(&conn).expect("server peer"),
            Peer::Node("east1".into())
        );
        let (server_conn, peer) = timeout(WAIT, accepted)
            .await
            .expect("accept in time")
            .expect("accept task")
            .expect("an incoming connection")
            .expect("server handshake succeeds");
        assert_eq!(peer, Peer::Controller);

        // The connection carries data both ways.
        let (mut send, mut recv) = timeout(WAIT, conn.open_bi())
            .await
            .expect("open in time")
            .expect("open stream");
        send.write_all(b"ping").await.expect("write ping");
        send.finish().expect("finish");
        let (mut server_send, mut server_recv) = timeout(WAIT, server_conn.accept_bi())
            .await
            .expect("accept stream in time")
            .expect("accept stream");
        let got = timeout(WAIT, server_recv.read_to_end(64))
            .await
            .expect("read in time")
            .expect("read ping");
        assert_eq!(got, b"ping");
        server_send.write_all(b"pong").await.expect("write pong");
        server_send.finish().expect("finish");
        let got = timeout(WAIT, recv.read_to_end(64))
            .await
            .expect("read in time")
            .expect("read pong");
        assert_eq!(got, b"pong");
    }

    #[tokio::test]
    async fn pooled_frames_put_chunk_payloads_on_a_block_boundary_and_hash_raw_ones() {
        use crate::frame::read_frame_hashing;
        use crate::pool::{is_aligned, Pool, ALIGN};
        use mover_protocol::hash::chunk_hash;
        use mover_protocol::{Chunk, Encoding, Message};

        let (_dir, conn, server_conn) = controller_to_east1().await;

        const CAP: usize = 640 << 10;
        // Files 3 and 5 are known: 4 MiB and 1000 bytes long.
        let file_size = |file: u32| match file {
            3 => Some(4u64 << 20),
            5 => Some(1000),
            _ => None,
        };
        let chunk = |file: u32, offset: u64, len: usize, seed: u32| {
            let payload: Vec<u8> = (0..len as u32)
                .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
                .collect();
            Chunk {
                file,
                offset,
                raw_len: len as u32,
                encoding: Encoding::Raw,
                hash: [seed as u8; 32],
                payload: payload.into(),
            }
        };
        let mut compressed = chunk(3, 0, 1000, 6);
        compressed.encoding = Encoding::Zstd;
        let mut short = chunk(3, 0, 1000, 7);
        short.raw_len = 2000;
        // Each frame, and the hash it should come with: a chunk of several hash pieces, a
        // short one, one too large to pad within the pool's buffers, one that is a whole
        // file; then ones not hashed as they arrive (no chunk of the file, or not sent
        // raw), each read whole all the same: an empty one, one off a BLAKE3 chunk
        // boundary, one of a file not known, a compressed one, and one whose length does
        // not match its payload.
        let sent: Vec<(Chunk, Option<[u8; 32]>)> = [
            chunk(3, 1 << 20, 600 << 10, 1),
            chunk(3, 2 << 20, 1000, 2),
            chunk(3, 3 << 20, CAP + 100, 3),
            chunk(5, 0, 1000, 4),
        ]
        .into_iter()
        .map(|c| {
            let size = file_size(c.file).expect("a known file");
            let h = chunk_hash(&c.payload, c.offset, size);
            (c, Some(h))
        })
        .chain([
            (chunk(3, 1 << 20, 0, 5), None),
            (chunk(3, 1000, 1000, 9), None),
            (chunk(9, 0, 1000, 8), None),
            (compressed, None),
            (short, None),
        ])
        .collect();
        let mut send = conn.open_uni().await.expect("open stream");
        for (c, _) in &sent {
            let frame = Message::Chunk(c.clone()).to_frame();
            send.write_all(&frame).await.expect("write frame");
        }
        send.finish().expect("finish");
        let mut recv = timeout(WAIT, server_conn.accept_uni())
            .await
            .expect("accept stream in time")
            .expect("accept stream");
        let pool = Pool::new(CAP + ALIGN, 4);
        for (i, (want, want_hash)) in sent.iter().enumerate() {
            let (frame, hashed) = timeout(
                WAIT,
                read_frame_hashing(&mut recv, 1 << 20, &pool, file_size),
            )
            .await
            .expect("read in time")
            .expect("read frame")
            .expect("a frame");
            assert_eq!(
                frame.bytes,
                Message::Chunk(want.clone()).to_frame(),
                "frame {i} arrives as sent"
            );
            assert_eq!(hashed, *want_hash, "frame {i}: hash as it arrived");
            if want.raw_len as usize != want.payload.len() {
                assert!(frame.decode().is_err(), "frame {i} is refused when decoded");
                continue;
            }
            let Message::Chunk(got) = frame.decode().expect("decode") else {
                panic!("frame {i} is a chunk");
            };
            assert_eq!(got.payload, want.payload);
            let fits = want.payload.len() <= CAP;
            assert_eq!(
                is_aligned(&got.payload),
                fits,
                "payload {i} aligned: {fits}"
            );
        }
        let end = read_frame_hashing(&mut recv, 1 << 20, &pool, file_size).await;
        assert!(matches!(end, Ok(None)), "then the stream ends");
    }

    #[test]
    fn many_connections_share_the_window_budget() {
        // One to three connections keep the full window; more share the budget.
        for n in [0, 1, 2, 3] {
            assert_eq!(window_for(n), WINDOW, "{n}");
        }
        assert_eq!(window_for(8), 6 << 20);
        for n in [4, 5, 8, 16, 24] {
            let total = u64::from(window_for(n)) * n as u64;
            assert!(total <= u64::from(WINDOW_BUDGET), "{n}: {total}");
        }
        // Never below the floor, even with the most connections a hop may have.
        assert_eq!(
            window_for(usize::from(mover_protocol::MAX_CONNECTIONS)),
            MIN_WINDOW
        );
    }

    #[tokio::test]
    async fn mtu_discovery_finds_large_loopback_packets() {
        let (_dir, conn, _server_conn) = controller_to_east1().await;

        // Both endpoints must accept large datagrams for discovery to climb past Ethernet size.
        let climbed = timeout(WAIT, async {
            while conn.stats().path.current_mtu <= 1500 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let mtu = conn.stats().path.current_mtu;
        assert!(climbed.is_ok(), "mtu stayed at {mtu}");
    }

    #[tokio::test]
    async fn loopback_peers_send_their_largest_packets_from_the_start() {
        let Some(lo) = loopback_transport_config() else {
            eprintln!("SKIPPED: loopback's MTU is unknown here (no /sys/class/net/lo/mtu)");
            return;
        };
        let dir = cluster(&["east1", "east2"]);
        let node = paths(dir.path(), "east2");
        let client = dialer(&node);
        let id = Identity::load(&node).expect("identity");
        let lo_client = tls::client_config(&id, Arc::new(lo)).expect("loopback client config");
        let (conn, server_conn) = to_east1(dir.path(), &client, Some(&lo_client)).await;
        assert!(
            conn.stats().path.current_mtu > 9000,
            "mtu {}",
            conn.stats().path.current_mtu
        );
        // 8 MiB arrive whole, in far fewer datagrams than 1,200-byte packets would take.
        let data = vec![7u8; 8 << 20];
        let mut send = conn.open_uni().await.expect("open stream");
        let sent = tokio::spawn(async move {
            send.write_all(&data).await.expect("write");
            send.finish().expect("finish");
            send.stopped().await.ok();
        });
        let mut recv = timeout(WAIT, server_conn.accept_uni())
            .await
            .expect("stream in time")
            .expect("a stream");
        let got = timeout(WAIT, recv.read_to_end(16 << 20))
            .await
            .expect("read in time")
            .expect("read");
        assert_eq!(got.len(), 8 << 20);
        assert!(got.iter().all(|&b| b == 7));
        sent.await.expect("sender");
        let datagrams = conn.stats().udp_tx.datagrams;
        assert!(datagrams < (8 << 20) / 9000, "{datagrams} datagrams");
    }

    #[tokio::test]
    async fn server_refuses_client_of_another_ca() {
        let ours = cluster(&["east1"]);
        let theirs = cluster(&[]);
        // The intruder trusts both CAs, so it accepts our server; only the server can refuse.
        let both = theirs.path().join("both.pem");
        let mut pem = std::fs::read(ours.path().join("ca.pem")).expect("read ca");
        pem.extend(std::fs::read(theirs.path().join("ca.pem")).expect("read other ca"));
        std::fs::write(&both, pem).expect("write combined ca");
        let mut intruder = paths(theirs.path(), "controller");
        intruder.ca = both;

        let server = listener(&paths(ours.path(), "east1"));
        let addr = server.local_addr().expect("server addr");
        let client = dialer(&intruder);
        let accepted = accept_one(&server);

        // With TLS 1.3 the client may finish its side before the server checks its cert, so the
        // refusal shows either as a failed connect or as the connection closing.
        match timeout(WAIT, connect(&client, None, addr, "east1"))
            .await
            .expect("connect in time")
        {
            Err(e) => assert!(!e.is_retryable(), "{e}"),
            Ok(conn) => {
                let opened = async {
                    let mut send = conn.open_uni().await?;
                    send.write_all(b"hello").await?;
                    conn.accept_uni().await?;
                    Ok::<_, Box<dyn std::error::Error>>(())
                };
                let res = timeout(WAIT, opened).await.expect("stream fails in time");
                assert!(res.is_err(), "the stream must fail");
            }
        }
        let server_side = timeout(WAIT, accepted)
            .await
            .expect("server done in time")
            .expect("accept task")
            .expect("an incoming connection");
        let err = server_side
            .map(|(_, peer)| peer)
            .expect_err("server must refuse");
        assert!(err.contains("certificate") || err.contains("CA"), "{err}");
    }

    #[tokio::test]
    async fn client_refuses_server_of_another_ca() {
        let ours = cluster(&["east1"]);
        let theirs = cluster(&["east1"]);
        let server = listener(&paths(ours.path(), "east1"));
        let addr = server.local_addr().expect("server addr");
        let client = dialer(&paths(theirs.path(), "controller"));
        let accepted = accept_one(&server);

        let err = timeout(WAIT, connect(&client, None, addr, "east1"))
            .await
            .expect("connect in time")
            .expect_err("client must refuse");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        let server_side = timeout(WAIT, accepted)
            .await
            .expect("server done in time")
            .expect("accept task")
            .expect("an incoming connection");
        assert!(server_side.is_err(), "server must not get a connection");
    }

    #[tokio::test]
    async fn connect_fails_when_server_is_another_node() {
        let dir = cluster(&["east1", "east2"]);
        let server = listener(&paths(dir.path(), "east1"));
        let addr = server.local_addr().expect("server addr");
        let client = dialer(&paths(dir.path(), "controller"));
        let _accepted = accept_one(&server);

        let err = timeout(WAIT, connect(&client, None, addr, "east2"))
            .await
            .expect("connect in time")
            .expect_err("wrong node must fail");
        let text = err.to_string();
        assert!(text.contains("east2"), "{text}");
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("certificate"), "{text}");
        assert!(!err.is_retryable(), "{text}");
    }

    #[tokio::test]
    async fn second_listener_on_same_address_names_it() {
        let dir = cluster(&["east1"]);
        let first = listener(&paths(dir.path(), "east1"));
        let addr = first.local_addr().expect("first addr");
        let id = Identity::load(&paths(dir.path(), "east1")).expect("load identity");
        let config = tls::server_config(&id, Arc::new(transport_config())).expect("config");
        let err = server_endpoint(addr, config).expect_err("address is taken");
        assert!(matches!(err, NetError::AddrInUse { .. }), "{err:?}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
