//! The floor for the `pkcs11` backend's signing path: `C_Sign` called in process with
//! cryptoki on the same token, no plugin, no engine. Prints p50/p99 latency and signatures
//! per second for each key type at concurrency 1 and 16 (one session per thread).
//! `scripts/bench-pkcs11.sh` runs it beside the plugin measured through SPIRE's facade.
//!
//! Usage: raw_sign_bench MODULE TOKEN_LABEL PIN [SECONDS_PER_CELL]

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark tool: a panic is a failed run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: raw_sign_bench MODULE TOKEN_LABEL PIN [SECONDS_PER_CELL]");
        std::process::exit(2);
    }
    let seconds: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let context = Pkcs11::new(&args[1]).unwrap();
    context
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| context.get_token_info(*s).unwrap().label().trim_end() == args[2])
        .expect("the token");
    let pin = AuthPin::from(args[3].as_str());
    let session = context.open_rw_session(slot).unwrap();
    session.login(UserType::User, Some(&pin)).unwrap();
    let context = Arc::new(context);
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let p384 = vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    for (name, ec, param, digest_len) in [
        ("ec-p256", true, p256, 32usize),
        ("ec-p384", true, p384, 48),
        ("rsa-2048", false, vec![], 2048),
        ("rsa-4096", false, vec![], 4096),
    ] {
        let mut public = vec![Attribute::Token(false), Attribute::Verify(true)];
        let (mechanism, data) = if ec {
            public.push(Attribute::EcParams(param));
            (Mechanism::EccKeyPairGen, vec![7u8; digest_len])
        } else {
            public.push(Attribute::ModulusBits((digest_len as u64).into()));
            public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            // A SHA-256 DigestInfo, as the backend sends for PKCS#1 v1.5.
            let mut info = vec![
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ];
            info.extend([7u8; 32]);
            (Mechanism::RsaPkcsKeyPairGen, info)
        };
        let private = [
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        let (_, key) = session
            .generate_key_pair(&mechanism, &public, &private)
            .unwrap();
        for concurrency in [1usize, 16] {
            let (p50, p99, rate) = run(&context, slot, key, ec, &data, concurrency, seconds);
            println!(
                "{name} c={concurrency} in-process-cryptoki p50={p50}µs p99={p99}µs signs/s={rate:.0}"
            );
        }
    }
}

fn run(
    context: &Arc<Pkcs11>,
    slot: Slot,
    key: ObjectHandle,
    ec: bool,
    data: &[u8],
    concurrency: usize,
    seconds: f64,
) -> (u128, u128, f64) {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let context = context.clone();
            let data = data.to_vec();
            std::thread::spawn(move || {
                // Session objects are visible to every session of the application.
                let session = context.open_rw_session(slot).unwrap();
                let mechanism = if ec {
                    Mechanism::Ecdsa
                } else {
                    Mechanism::RsaPkcs
                };
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    session.sign(&mechanism, key, &data).unwrap();
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pick = |q: usize| all[(all.len() * q / 100).min(all.len() - 1)].as_micros();
    (pick(50), pick(99), all.len() as f64 / elapsed)
}
