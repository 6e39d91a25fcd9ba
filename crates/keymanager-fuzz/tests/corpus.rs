//! The fuzz targets' regression run, in CI: every file of `fuzz/corpus/<target>/` (seeds and
//! every crash a campaign found) replayed through the target, then a few seconds of inputs
//! mutated from the corpus. `FUZZ_REGRESSION_MS` sets the mutation time per target (default
//! 2000), `FUZZ_SEED` replays one run's mutations (the seed is printed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keymanager_fuzz::{TARGETS, Target};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .expect("the target has a corpus directory")
        .map(|entry| {
            let path = entry.expect("the corpus directory lists").path();
            let bytes = std::fs::read(&path).expect("a corpus file reads");
            (path.display().to_string(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// Runs one input; on a failure, says which input and where it was saved.
fn run_one(target: &Target, what: &str, input: &[u8]) {
    if let Err(panic) = std::panic::catch_unwind(|| (target.run)(input)) {
        let saved =
            std::env::temp_dir().join(format!("kms-keymanager-fuzz-failure-{}", target.name));
        let _ = std::fs::write(&saved, input);
        eprintln!(
            "target {} failed on {what} (saved to {}; add it to fuzz/corpus/{} once fixed)",
            target.name,
            saved.display(),
            target.name
        );
        std::panic::resume_unwind(panic);
    }
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'=', b'{', b'}', b'\n', b':', b'-', b'0',
];

/// A few AFL-style mutations of a corpus input.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => out.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 if at < out.len() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                out.drain(at..end);
            }
            4 if at < out.len() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                let piece = out[at..end].to_vec();
                let to = rng.below(out.len() + 1);
                out.splice(to..to, piece);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(32)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn regression(name: &str) {
    let target = TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("the target exists");
    let files = corpus(name);
    assert!(!files.is_empty(), "fuzz/corpus/{name} is empty");
    for (path, bytes) in &files {
        run_one(target, path, bytes);
    }
    let budget = std::env::var("FUZZ_REGRESSION_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(2), Duration::from_millis);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < budget {
        let (path, input) = &files[rng.below(files.len())];
        let other = &files[rng.below(files.len())].1;
        let mutated = mutate(&mut rng, input, other);
        run_one(
            target,
            &format!("a mutation of {path} (FUZZ_SEED={seed})"),
            &mutated,
        );
        runs += 1;
    }
    eprintln!(
        "{name}: {} corpus files, {runs} mutated inputs in {:?} (FUZZ_SEED={seed})",
        files.len(),
        started.elapsed()
    );
}

#[test]
fn plugin_data_corpus_and_mutations() {
    regression("plugin_data");
}

#[test]
fn key_file_corpus_and_mutations() {
    regression("key_file");
}

#[test]
fn private_key_corpus_and_mutations() {
    regression("private_key");
}

#[test]
fn names_corpus_and_mutations() {
    regression("names");
}

#[test]
fn request_corpus_and_mutations() {
    regression("request");
}

#[test]
fn ecdsa_der_corpus_and_mutations() {
    regression("ecdsa_der");
}

#[test]
fn every_target_has_a_regression_test() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "plugin_data",
            "key_file",
            "private_key",
            "names",
            "request",
            "ecdsa_der"
        ]
    );
}
