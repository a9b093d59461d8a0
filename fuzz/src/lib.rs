//! Fuzz targets for what the edge parses from the network and from operators — DNS queries,
//! cache headers, config documents, inference bodies, forwarding headers, request paths — and a
//! small mutation driver that runs them on the stable toolchain, without afl or libFuzzer.
//!
//! The driver is not coverage-guided: it mutates seed inputs built by code (bit flips,
//! interesting bytes, dictionary tokens, insertions, deletions, splices) and checks each target's
//! own invariants besides "does not panic". `cargo run --release -p meridian-fuzz` runs every
//! target (figures in `docs/security.md`); the crate's test runs a few seconds of each.

use std::panic::{catch_unwind, AssertUnwindSafe};

mod targets;

pub use targets::all;

/// One fuzz target: seed inputs and a function that panics when an invariant breaks.
pub struct Target {
    pub name: &'static str,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub run: fn(&[u8]),
    /// Tokens the mutator inserts (syntax the parser cares about).
    pub dictionary: &'static [&'static [u8]],
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    /// Inputs that panicked (each a reproducer).
    pub crashes: Vec<Vec<u8>>,
}

/// SplitMix64: a fast deterministic generator, so a run is reproduced by its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u8; 16] = [
    0, 0x7f, 0x80, 0xff, b'%', b'/', b'.', b';', b'"', b',', b'=', b'\\', b'\n', b' ', b'[', b'{',
];
/// Inputs grow by insertion; this keeps each execution cheap.
const MAX_INPUT: usize = 4096;

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], dictionary: &[&[u8]]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next_u64() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                input.drain(i..i + n);
            }
            4 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())];
                let i = rng.below(len + 1);
                input.splice(i..i, token.iter().copied());
            }
            5 if len > 0 => {
                // Duplicate a chunk (repetition finds counting bugs).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let chunk: Vec<u8> = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next_u64() as u8;
            }
            _ => input.push(rng.next_u64() as u8),
        }
    }
    input.truncate(MAX_INPUT);
}

/// Runs `target` on its seeds, then on `iterations` mutated inputs from generator `seed`.
/// Panics are caught and their inputs returned; the panic hook is the caller's business.
pub fn fuzz(target: &Target, iterations: u64, seed: u64) -> Report {
    let mut report = Report::default();
    let mut corpus = (target.seeds)();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut rng = Rng(seed);
    let run = |input: &[u8], report: &mut Report| {
        report.executions += 1;
        if catch_unwind(AssertUnwindSafe(|| (target.run)(input))).is_err() {
            report.crashes.push(input.to_vec());
        }
    };
    for input in &corpus {
        run(input, &mut report);
    }
    let seeds = corpus.len();
    for i in 0..iterations {
        let pick = rng.below(corpus.len());
        let other = corpus[rng.below(corpus.len())].clone();
        let mut input = corpus[pick].clone();
        mutate(&mut rng, &mut input, &other, target.dictionary);
        run(&input, &mut report);
        // Without coverage feedback, keep a rolling set of mutants so inputs drift further from
        // the seeds than one round of mutation reaches.
        if i % 64 == 0 {
            if corpus.len() < seeds + 256 {
                corpus.push(input);
            } else {
                let slot = seeds + rng.below(256);
                corpus[slot] = input;
            }
        }
    }
    report
}

/// Replays one input (a reproducer) against the target of that name.
pub fn replay(name: &str, input: &[u8]) -> Option<Result<(), String>> {
    let target = all().into_iter().find(|t| t.name == name)?;
    Some(
        catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        }),
    )
}

/// Writes `target`'s seed inputs into `dir` (created), one file each: an AFL++ input corpus.
pub fn write_seeds(target: &Target, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, seed) in (target.seeds)().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), seed)?;
    }
    Ok(())
}

/// `target`'s dictionary in AFL's format: one quoted token a line, bytes outside printable
/// ASCII (and `"`, `\`) as `\xNN`.
pub fn afl_dictionary(target: &Target) -> String {
    let mut out = String::new();
    for token in target.dictionary {
        out.push('"');
        for &b in *token {
            if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out.push_str("\"\n");
    }
    out
}
