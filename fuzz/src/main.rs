//! `cargo run --release -p meridian-fuzz -- [--iterations N] [--seed S] [TARGET...]`: runs each
//! target (all by default) and prints executions, crashes and speed; a crashing input is written
//! to `fuzz/crashes/<target>-<n>` for `--replay TARGET FILE`. Exits non-zero on any crash.

use std::time::Instant;

fn main() -> std::process::ExitCode {
    let mut iterations: u64 = 1_000_000;
    let mut seed: u64 = 1;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(iterations)
            }
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            "--replay" => {
                let (Some(name), Some(file)) = (args.next(), args.next()) else {
                    eprintln!("--replay TARGET FILE");
                    return std::process::ExitCode::FAILURE;
                };
                let input = match std::fs::read(&file) {
                    Ok(input) => input,
                    Err(e) => {
                        eprintln!("{file}: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                };
                return match meridian_fuzz::replay(&name, &input) {
                    Some(Ok(())) => {
                        println!("{name}: no crash");
                        std::process::ExitCode::SUCCESS
                    }
                    Some(Err(message)) => {
                        println!("{name}: crash: {message}");
                        std::process::ExitCode::FAILURE
                    }
                    None => {
                        eprintln!("no target {name}");
                        std::process::ExitCode::FAILURE
                    }
                };
            }
            other => names.push(other.to_string()),
        }
    }
    // Crashes are collected and reported below; the default hook would print each one.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    println!("| target | executions | crashes | seconds | exec/s |");
    println!("|---|---:|---:|---:|---:|");
    for target in meridian_fuzz::all() {
        if !names.is_empty() && !names.iter().any(|n| n == target.name) {
            continue;
        }
        let started = Instant::now();
        let report = meridian_fuzz::fuzz(&target, iterations, seed);
        let secs = started.elapsed().as_secs_f64();
        println!(
            "| {} | {} | {} | {:.1} | {:.0} |",
            target.name,
            report.executions,
            report.crashes.len(),
            secs,
            report.executions as f64 / secs.max(1e-9)
        );
        for (i, input) in report.crashes.iter().enumerate().take(10) {
            let path = format!("fuzz/crashes/{}-{i}", target.name);
            let _ = std::fs::create_dir_all("fuzz/crashes");
            if std::fs::write(&path, input).is_ok() {
                println!("  reproducer: {path}");
            }
        }
        failed |= !report.crashes.is_empty();
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
