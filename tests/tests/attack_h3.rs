//! HTTP/3 address validation seen from the client's side of the wire: a UDP relay between a real
//! quinn client and the edge reads the packets the edge sends back, so the test observes the
//! Retry itself (not the edge's own account of it), and that the connection then works.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meridian_tests::h3client::{client_config, H3Connection};
use meridian_tests::{local_config, World};
use tokio::net::UdpSocket;

/// What the relay saw coming back from the server.
#[derive(Default)]
struct Seen {
    datagrams: AtomicU64,
    retries: AtomicU64,
}

/// A QUIC version 1 Retry packet: long header (0x80), packet type 3 in bits 4–5 (the type bits
/// of a long header are not header-protected), version 0x00000001.
fn is_retry(datagram: &[u8]) -> bool {
    datagram.len() >= 5
        && datagram[0] & 0x80 != 0
        && (datagram[0] >> 4) & 0x03 == 0x03
        && datagram[1..5] == [0, 0, 0, 1]
}

/// Relays one client's datagrams to `server` from `source` (the address the edge sees) and the
/// server's back, counting what comes back. Returns the address the client connects to.
async fn relay(source: IpAddr, server: SocketAddr, seen: Arc<Seen>) -> SocketAddr {
    let front = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the relay's client side");
    let back = UdpSocket::bind((source, 0))
        .await
        .expect("bind the relay's server side");
    back.connect(server).await.expect("relay to the edge");
    let address = front.local_addr().expect("relay address");
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        loop {
            tokio::select! {
                received = front.recv_from(&mut up) => {
                    let Ok((n, from)) = received else { return };
                    client = Some(from);
                    let _ = back.send(&up[..n]).await;
                }
                received = back.recv(&mut down) => {
                    let Ok(n) = received else { return };
                    seen.datagrams.fetch_add(1, Ordering::Relaxed);
                    if is_retry(&down[..n]) {
                        seen.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(client) = client {
                        let _ = front.send_to(&down[..n], client).await;
                    }
                }
            }
        }
    });
    address
}

/// Connects through a relay, makes one request, and returns what the relay saw.
fn connect_and_request(world: &World) -> Arc<Seen> {
    let target = world.edge.https_addr.expect("https");
    let roots = world.tls.as_ref().expect("tls").roots();
    let seen = Arc::new(Seen::default());
    let source = meridian_tests::source_for("SG");
    let via = world
        .runtime
        .block_on(relay(source, target, Arc::clone(&seen)));
    let config = client_config(roots).expect("client config");
    let mut connection = world
        .runtime
        .block_on(H3Connection::connect(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            via,
            "api.example.test",
            config,
        ))
        .expect("connection through the relay");
    let reply = world
        .runtime
        .block_on(connection.request("GET", "api.example.test", "/hello", &[], Vec::new()))
        .expect("request");
    assert_eq!(reply.status, 200);
    world.runtime.block_on(connection.close());
    seen
}

/// `retry_above = 0`: every new client gets a Retry first, and a client that follows it is
/// served.
#[test]
fn the_client_sees_a_retry_when_the_edge_always_validates_addresses() {
    let mut config = local_config();
    config.edge.h3_limits.retry_above = 0;
    let world = World::start(config);
    let seen = connect_and_request(&world);
    assert!(
        seen.retries.load(Ordering::Relaxed) >= 1,
        "retry_above = 0: the edge answered the first Initial with a Retry ({} datagrams back)",
        seen.datagrams.load(Ordering::Relaxed)
    );
}

/// With the default threshold and an idle edge, a new client is not sent a Retry: the check
/// above sees Retries only because the edge sends them.
#[test]
fn the_client_sees_no_retry_below_the_threshold() {
    let config = local_config();
    assert!(config.edge.h3_limits.retry_above > 0);
    let world = World::start(config);
    let seen = connect_and_request(&world);
    assert!(seen.datagrams.load(Ordering::Relaxed) > 0);
    assert_eq!(
        seen.retries.load(Ordering::Relaxed),
        0,
        "below the threshold: no Retry"
    );
}
