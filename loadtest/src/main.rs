//! `meridian-loadtest`: a geo-aware load generator (closed and open loop, h1/h2/h3, SSE) and a fast fake
//! origin with fault injection. See `docs/benchmarks.md`.

mod cli;
mod duration;
mod engine;
mod geo;
mod h1lean;
mod idle;
mod origin;
mod prefix;
mod protocol;
mod report;
mod rlimit;
mod slowloris;
mod stats;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    rlimit::raise_nofile();
    let result = match cli.command {
        Some(cli::Command::Origin(args)) => origin::main(args),
        Some(cli::Command::ModelServers(args)) => prefix::model_servers(args),
        Some(cli::Command::PrefixLoad(args)) => prefix::prefix_load(args),
        None if cli.load.slow.is_some() => slowloris::main(cli.load),
        None if cli.load.idle.is_some() => idle::main(cli.load),
        None => engine::main(cli.load),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meridian-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
