//! The framework ceiling for the side-by-side benchmark (`loadtest/bench/run.sh`, proxy `pingora`):
//! a bare Pingora `ProxyHttp` that sends every request to one fixed peer and does nothing else — no
//! routing, no cache, no metrics, no header rewriting. It runs like the gateway's TCP front (one
//! worker thread, no work stealing, mimalloc), so the gap between this and `meridian serve` is what
//! Meridian's own work costs, and the gap between this and NGINX/HAProxy is the framework's.
//!
//! ```text
//! cargo build --release -p meridian-gateway --example bare_pingora
//! bare_pingora LISTEN PEER        # e.g. bare_pingora 127.0.0.1:18110 127.0.0.1:18100
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::upstreams::peer::HttpPeer;

/// The gateway's allocator, so the comparison is about the request cycle and not malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct FixedPeer {
    peer: SocketAddr,
}

#[async_trait]
impl ProxyHttp for FixedPeer {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        // Cleartext, no SNI: the origin is a plain HTTP/1.1 server on loopback.
        Ok(Box::new(HttpPeer::new(self.peer, false, String::new())))
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(peer), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: bare_pingora LISTEN_ADDR PEER_ADDR");
        return ExitCode::from(2);
    };
    let (Ok(listen), Ok(peer)) = (listen.parse::<SocketAddr>(), peer.parse::<SocketAddr>()) else {
        eprintln!("bare_pingora: LISTEN_ADDR and PEER_ADDR must be ip:port");
        return ExitCode::from(2);
    };
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        // SIGTERM (how the bench script stops it) would otherwise wait Pingora's default grace
        // period of five minutes before exiting.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, FixedPeer { peer });
    proxy.add_tcp(&listen.to_string());
    server.add_service(proxy);
    // Runs until SIGINT/SIGTERM; run_forever exits the process itself.
    server.run_forever();
}
