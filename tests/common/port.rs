//! Free UDP ports for test agents, shared by the test harnesses of `mover` and `mover-cli`.

use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports below the kernel's ephemeral range the tests may use.
const SPAN: u32 = 10_000;

/// A UDP port on 127.0.0.1 that nothing holds now, for an agent to bind a little later.
///
/// Binding port 0 and closing the socket again is not enough: between that and the agent's
/// bind, any socket bound to port 0 (another test's client endpoint, an agent's outgoing
/// connections) may be given the same port by the kernel, and the agent then fails with
/// "address already in use". So the ports come from just below the ephemeral range, which the
/// kernel never hands out by itself. Within one test process a counter keeps two clusters from
/// getting the same port; each process starts at its own place (from its process id), and a
/// port some other program holds is passed over.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low();
    if low <= SPAN + 1024 {
        // An unusual range: fall back to letting the kernel choose.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
        return s.local_addr().expect("local address").port();
    }
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low - SPAN + (start + n) % SPAN) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port in {}..{low}", low - SPAN);
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
