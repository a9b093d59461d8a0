//! AFL++ harness for every target (persistent mode), built with cargo-afl:
//!
//! - `meridian-fuzz-afl TARGET` runs TARGET on the inputs afl-fuzz feeds it;
//! - `meridian-fuzz-afl --seeds TARGET DIR` writes the target's seed inputs (the input corpus);
//! - `meridian-fuzz-afl --dict TARGET FILE` writes its dictionary in AFL's format;
//! - `meridian-fuzz-afl --list` names the targets.
//!
//! Seeds and dictionary come from this binary so that preparing a campaign does not need a
//! second, uninstrumented build of the crate. The commands are in `docs/security.md`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let find = |name: &str| meridian_fuzz::all().into_iter().find(|t| t.name == name);
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--list"] => {
            for target in meridian_fuzz::all() {
                println!("{}", target.name);
            }
            ExitCode::SUCCESS
        }
        [flag @ ("--seeds" | "--dict"), name, out] => {
            let Some(target) = find(name) else {
                eprintln!("no target {name}");
                return ExitCode::FAILURE;
            };
            let written = if *flag == "--seeds" {
                meridian_fuzz::write_seeds(&target, std::path::Path::new(out))
            } else {
                std::fs::write(out, meridian_fuzz::afl_dictionary(&target))
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{out}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        [name] => {
            let Some(target) = find(name) else {
                eprintln!("no target {name}");
                return ExitCode::FAILURE;
            };
            // The targets' parsed config, zone and route table are built on first use: build
            // them here, before the fork server starts, not once per forked child.
            for seed in (target.seeds)() {
                (target.run)(&seed);
            }
            let run = target.run;
            afl::fuzz!(|data: &[u8]| {
                run(data);
            });
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: meridian-fuzz-afl TARGET | --seeds TARGET DIR | --dict TARGET FILE | --list");
            ExitCode::from(2)
        }
    }
}
