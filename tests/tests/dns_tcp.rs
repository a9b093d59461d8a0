//! GeoDNS over TCP shares its connection slots fairly: one client address holds at most
//! `dns.limits.max_tcp_per_address` connections; past that its new ones are closed at once while
//! other addresses are served, and a closed connection gives the address its share back.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use meridian_tests::{local_config, metric_value, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

async fn connect(server: SocketAddr, source: IpAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind source");
    socket.connect(server).await.expect("connect")
}

/// One query on an open connection: `Some(answer)`, or `None` when the server closed it.
async fn ask(stream: &mut TcpStream) -> Option<Message> {
    let mut message = Message::query();
    message.add_query(Query::query(
        Name::from_ascii("api.example.test.").expect("name"),
        RecordType::A,
    ));
    let bytes = message.to_vec().expect("encodes");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    if stream.write_all(&framed).await.is_err() {
        return None;
    }
    let read = async {
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    match tokio::time::timeout(WAIT, read).await {
        Ok(Ok(reply)) => Some(Message::from_vec(&reply).expect("answer decodes")),
        Ok(Err(_)) => None,
        Err(_) => panic!("neither an answer nor a close within the bound"),
    }
}

#[test]
fn one_address_gets_its_share_of_tcp_slots_and_others_are_served() {
    let mut config = local_config();
    for pop in &mut config.pops {
        pop.health = None;
    }
    let dns = config.dns.as_mut().expect("[dns]");
    dns.limits.max_tcp_per_address = 2;
    dns.rrl.responses_per_second = 0;
    let world = World::start(config);
    let server = world.edge.dns_addr.expect("the edge runs GeoDNS");
    let greedy: IpAddr = "127.15.0.53".parse().expect("ip");
    let other: IpAddr = "127.17.0.53".parse().expect("ip");

    world.runtime.block_on(async {
        let mut first = connect(server, greedy).await;
        let mut second = connect(server, greedy).await;
        // Answered queries: both connections are accepted and counted.
        assert!(ask(&mut first).await.is_some());
        assert!(ask(&mut second).await.is_some());
        let mut third = connect(server, greedy).await;
        assert!(ask(&mut third).await.is_none(), "over the share: closed");
        let mut elsewhere = connect(server, other).await;
        assert!(
            ask(&mut elsewhere).await.is_some(),
            "other addresses served"
        );
        assert!(
            ask(&mut first).await.is_some(),
            "held connections keep working"
        );

        // Closing one gives the share back (the server notices the close asynchronously).
        drop(first);
        let deadline = Instant::now() + WAIT;
        loop {
            let mut again = connect(server, greedy).await;
            if ask(&mut again).await.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "the slot came back");
            tokio::task::yield_now().await;
        }
    });
    let refused = metric_value(&world.metrics(), "meridian_dns_tcp_refused_total").unwrap_or(0.0);
    assert!(refused >= 1.0, "refusals counted: {refused}");
}
