//! The fuzz smoke that runs with the normal test command: every target's seeds plus a few
//! thousand mutants (seconds in all), so a parser change that panics on odd input fails CI.

#[test]
fn every_target_survives_its_seeds_and_a_short_run() {
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for target in meridian_fuzz::all() {
        let report = meridian_fuzz::fuzz(&target, 10_000, 7);
        assert!(report.executions > 10_000, "{}", target.name);
        if let Some(input) = report.crashes.first() {
            failures.push(format!(
                "{}: {} crash(es), first input {:?}",
                target.name,
                report.crashes.len(),
                String::from_utf8_lossy(input)
            ));
        }
    }
    let _ = std::panic::take_hook();
    assert!(failures.is_empty(), "{failures:#?}");
}
