//! Command line. The load generator is the default command (`meridian-loadtest [OPTIONS] URL`);
//! `meridian-loadtest origin ...` runs the fake origin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration;

#[derive(Parser, Debug)]
#[command(
    name = "meridian-loadtest",
    version,
    about = "Geo-aware load generator (closed/open loop, h1/h2/h3, SSE, HDR percentiles) and fake origin",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A fast fake origin with latency and fault injection (h1 and h2c, optional TLS).
    Origin(OriginArgs),
    /// Simulated model servers with a slot limit, a queue and a prefix cache (inference bench).
    ModelServers(crate::prefix::ModelServerArgs),
    /// Open-loop chat calls over shared prompt prefixes of uneven popularity: time to first token.
    PrefixLoad(crate::prefix::PrefixLoadArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// HTTP/1.1, one request at a time per connection (keep-alive).
    H1,
    /// HTTP/2: h2c with prior knowledge for http:// URLs, ALPN h2 for https:// URLs.
    H2,
    /// HTTP/3 over QUIC (https:// URLs only), with the project's shared h3 client.
    H3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Plain request/response.
    Plain,
    /// Server-sent event streams: time to first byte, time to last byte, events/s.
    Sse,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Target URL, e.g. http://127.0.0.1:8080/hello (loopback addresses only).
    pub url: Option<String>,
    /// Closed loop: this many connections, each sending its next request when the previous one is done.
    /// In open loop: the connections the scheduled requests are spread over.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub connections: usize,
    /// Open loop: requests per second, arrival times scheduled in advance; latency is measured from the
    /// scheduled time (coordinated omission corrected).
    #[arg(short = 'r', long)]
    pub rate: Option<f64>,
    /// How long to send (default 10s when --requests is not given).
    #[arg(short = 'd', long, value_parser = duration::parse)]
    pub duration: Option<Duration>,
    /// Send exactly this many requests (then stop, or at --duration, whichever comes first).
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    #[arg(short = 'p', long, value_enum, default_value_t = ProtocolArg::H1)]
    pub protocol: ProtocolArg,
    /// HTTP/2 and HTTP/3: concurrent streams (request lanes) per connection.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Every request on a fresh connection (new TCP + TLS or QUIC handshake, closed after the
    /// response): measures handshake throughput. Nothing is connected before the clock starts.
    #[arg(long)]
    pub reconnect: bool,
    /// `MX=30,SG=20,KR=10`: bind client sockets to the test-world source ranges in these proportions.
    #[arg(long)]
    pub geo_mix: Option<String>,
    /// Host header (HTTP/1) / :authority (HTTP/2, HTTP/3); default: the URL's authority.
    #[arg(long)]
    pub host: Option<String>,
    /// Path (and query), overriding the URL's.
    #[arg(long)]
    pub path: Option<String>,
    #[arg(short = 'm', long, default_value = "GET")]
    pub method: String,
    /// Request body read from this file (sent with every request).
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// Extra request header `name:value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    #[arg(long, value_enum, default_value_t = Scenario::Plain)]
    pub scenario: Scenario,
    /// CA certificate (PEM) to trust for https:// targets.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// TLS server name for https:// targets (default: --host, then the URL's host).
    #[arg(long)]
    pub sni: Option<String>,
    /// Per-request timeout (connect + response + body).
    #[arg(long, value_parser = duration::parse, default_value = "10s")]
    pub timeout: Duration,
    /// Worker threads of the generator (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Slowloris: open N connections (cleartext HTTP/1.1) that each send
    /// `GET PATH HTTP/1.1`, `Host: HOST` and `X-a: `, then one more byte every --slow-interval
    /// and never finish the head. Reports how long the server kept them and what it answered.
    #[arg(long, value_name = "N", conflicts_with_all = ["idle", "rate", "requests", "reconnect"])]
    pub slow: Option<usize>,
    /// Slowloris: pause between the trickled bytes.
    #[arg(long, value_parser = duration::parse, default_value = "1s")]
    pub slow_interval: Duration,
    /// Slowloris: a connection the server has not closed after this long (from its connect) is
    /// given up and counted as still open, so a run always ends by itself.
    #[arg(long, value_parser = duration::parse, default_value = "60s")]
    pub slow_for: Duration,
    /// Idle keep-alive connections: open N connections, send one request on each, then hold them
    /// all idle for --idle-for. Prints `ready: ...` on stdout once they are all open, so a script
    /// can measure the server meanwhile.
    #[arg(long, value_name = "N", conflicts_with_all = ["rate", "requests", "reconnect"])]
    pub idle: Option<usize>,
    /// Idle mode: how long to hold the connections after they are all open.
    #[arg(long, value_parser = duration::parse, default_value = "60s")]
    pub idle_for: Duration,
    /// Send cleartext HTTP/1.1 load through hyper's client instead of the built-in lean one, which
    /// plain `http://` h1 runs use otherwise (SSE always uses hyper). The lean client spends under
    /// half of hyper's user CPU per request (about two thirds of its total); this is for comparing.
    #[arg(long)]
    pub hyper_h1: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct OriginArgs {
    /// Address to listen on (the first line printed is `listening on ADDR`; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// Fixed delay before each answer.
    #[arg(long, value_parser = duration::parse, default_value = "0ms")]
    pub latency: Duration,
    /// Extra uniformly random delay in [0, jitter).
    #[arg(long, value_parser = duration::parse, default_value = "0ms")]
    pub jitter: Duration,
    /// Fraction of requests answered `503` (0.0 ..= 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Response body size; a request may override it with the query `?bytes=N`.
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
    /// SSE: events per stream.
    #[arg(long, default_value_t = 20)]
    pub sse_events: u32,
    /// SSE: pause between events.
    #[arg(long, value_parser = duration::parse, default_value = "5ms")]
    pub sse_interval: Duration,
    /// Worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Serve TLS with this certificate chain (PEM); ALPN h2 and http/1.1.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
