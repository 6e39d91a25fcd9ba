use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::lifecycle::{parse_stamp, stamp_text};

/// Wall time that follows tokio's (paused) clock, so leases and waits are deterministic.
struct TestClock {
    base: SystemTime,
    start: Instant,
    /// This clock runs ahead of the store's by this much (clock skew between servers).
    ahead: Duration,
}

impl TestClock {
    fn new(ahead: Duration) -> Self {
        Self {
            base: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            start: Instant::now(),
            ahead,
        }
    }
}

impl WallClock for TestClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed() + self.ahead
    }
}

#[derive(Default)]
struct Store {
    generations: Vec<Generation>,
    /// Lock name → (lease end as recorded, holder).
    locks: HashMap<String, (String, String)>,
    creates: usize,
    fail_creates: bool,
    /// Like an AWS alias: the store keeps no lease end.
    unrecorded: bool,
}

/// A store in memory; every call takes 20 ms so that concurrent rotations interleave.
struct FakeOps {
    store: Mutex<Store>,
    clock: TestClock,
    /// The servers' lock sightings (one process's would do the same).
    sightings: LockSightings,
}

impl FakeOps {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(Store::default()),
            clock: TestClock::new(Duration::ZERO),
            sightings: LockSightings::default(),
        })
    }

    fn plant_lock(&self, lock: &str, expires: &str) {
        self.store.lock().unwrap().locks.insert(
            lock.to_string(),
            (expires.to_string(), "crashed".to_string()),
        );
    }

    fn creates(&self) -> usize {
        self.store.lock().unwrap().creates
    }
}

async fn latency() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

const RELEASED: &str = "0";

#[async_trait]
impl SharedOps for FakeOps {
    type Prepared = KeyType;

    fn lock_name(&self, basis: u64, attempt: u32) -> String {
        format!("lock-{basis}-{attempt}")
    }
    async fn generations(&self) -> Result<Vec<Generation>, BackendError> {
        latency().await;
        Ok(self.store.lock().unwrap().generations.clone())
    }
    async fn create_lock(&self, lock: LockRequest<'_>) -> Result<bool, BackendError> {
        latency().await;
        let mut store = self.store.lock().unwrap();
        if store.locks.contains_key(lock.name) {
            return Ok(false);
        }
        store.locks.insert(
            lock.name.to_string(),
            (stamp_text(lock.lease_end), lock.holder.to_string()),
        );
        Ok(true)
    }
    async fn lock_lease(&self, lock: &str) -> Result<(LockLease, Option<String>), BackendError> {
        latency().await;
        let store = self.store.lock().unwrap();
        let (expires, holder) = store.locks[lock].clone();
        if store.unrecorded {
            return Ok((LockLease::Unrecorded, None));
        }
        let lease = parse_stamp(&expires).map_or(LockLease::Over, LockLease::Until);
        Ok((lease, Some(holder)))
    }
    async fn release_lock(&self, lock: &str) {
        latency().await;
        if let Some(entry) = self.store.lock().unwrap().locks.get_mut(lock) {
            entry.0 = RELEASED.into();
        }
    }
    async fn prepare(&self, _basis: u64, key_type: KeyType) -> Result<KeyType, BackendError> {
        latency().await;
        Ok(key_type)
    }
    async fn discard(&self, _prepared: KeyType) {}
    async fn commit(&self, key_type: KeyType) -> Result<Generation, BackendError> {
        latency().await;
        let mut store = self.store.lock().unwrap();
        if store.fail_creates {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "backend error",
            ));
        }
        store.creates += 1;
        let number = store
            .generations
            .iter()
            .map(|g| g.number)
            .max()
            .unwrap_or(0)
            + 1;
        let generation = Generation {
            name: format!("{KEY}/cryptoKeyVersions/{number}"),
            number,
            live: true,
            key_type: Some(key_type),
            created: Some(self.clock.now()),
        };
        store.generations.push(generation.clone());
        Ok(generation)
    }
}

const KEY: &str = "projects/p/locations/l/keyRings/r/cryptoKeys/jwt";

fn rotation<'a>(
    ops: &'a FakeOps,
    clock: &'a TestClock,
    holder: &'a str,
) -> SharedRotation<'a, FakeOps> {
    SharedRotation {
        ops,
        clock,
        key: KEY,
        holder,
        lease: Duration::from_secs(20),
        skew: Duration::from_secs(5),
        reuse_window: Duration::from_secs(15 * 60),
        budget: Duration::from_secs(120),
        call_timeout: Duration::from_secs(8),
        poll: Duration::from_millis(200),
        last_served: None,
        sightings: &ops.sightings,
    }
}

async fn rotate(
    ops: Arc<FakeOps>,
    clock: Arc<TestClock>,
    holder: String,
) -> Result<String, BackendError> {
    Ok(rotation(&ops, &clock, &holder).rotate(P256).await?.name)
}

const P256: KeyType = KeyType::EcP256;

#[tokio::test(start_paused = true)]
async fn concurrent_rotations_create_exactly_one_version_and_all_adopt_it() {
    let ops = FakeOps::new();
    let clock = Arc::new(TestClock::new(Duration::ZERO));
    let rotations: Vec<_> = (0..4)
        .map(|i| tokio::spawn(rotate(ops.clone(), clock.clone(), format!("server-{i}"))))
        .collect();
    let mut served = Vec::new();
    for rotation in rotations {
        served.push(rotation.await.unwrap().unwrap());
    }
    assert_eq!(ops.creates(), 1);
    assert!(served.iter().all(|v| v == &served[0]), "{served:?}");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holders_lock_is_taken_over_after_the_lease_plus_the_skew() {
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    // A holder took attempt 0 and died: its lease ends 20 s from now.
    let lease_end = clock.now() + Duration::from_secs(20);
    ops.plant_lock("lock-0-0", &stamp_text(lease_end));
    let started = Instant::now();
    let version = rotation(&ops, &clock, "me").rotate(P256).await.unwrap();
    let waited = started.elapsed();
    assert!(version.name.ends_with("/cryptoKeyVersions/1"));
    assert_eq!(ops.creates(), 1);
    // The skew comes from clock_skew_allowance (5 s here), not a constant.
    assert!(
        waited >= Duration::from_secs(25),
        "took over too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(27), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn absurd_or_missing_lease_ends_never_hang_a_rotation() {
    for expires in ["18446744073709551615", "junk", ""] {
        let ops = FakeOps::new();
        let clock = TestClock::new(Duration::ZERO);
        ops.plant_lock("lock-0-0", expires);
        let started = Instant::now();
        rotation(&ops, &clock, "me").rotate(P256).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "{expires:?}");
    }
    // A lease that ends in the year 9999 is respected, but only until the budget ends.
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    ops.plant_lock("lock-0-0", "253402300799");
    let started = Instant::now();
    let err = rotation(&ops, &clock, "me").rotate(P256).await.unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unavailable);
    assert!(
        started.elapsed() <= Duration::from_secs(121),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(ops.creates(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_ends_the_rotation_inside_its_budget() {
    let ops = FakeOps::new();
    ops.store.lock().unwrap().fail_creates = true;
    let clock = TestClock::new(Duration::ZERO);
    let started = Instant::now();
    let err = rotation(&ops, &clock, "me").rotate(P256).await.unwrap_err();
    assert_eq!(err.message, "backend error");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_fresh_version_of_another_server_is_reused_but_not_one_served_here() {
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    let first = rotation(&ops, &clock, "a").rotate(P256).await.unwrap();
    // Another server rotating moments later adopts it.
    let adopted = rotation(&ops, &clock, "b").rotate(P256).await.unwrap();
    assert_eq!(adopted, first);
    assert_eq!(ops.creates(), 1);
    // The server that served it rotates for real.
    let mut again = rotation(&ops, &clock, "a");
    again.last_served = Some(1);
    let second = again.rotate(P256).await.unwrap();
    assert_ne!(second, first);
    assert_eq!(ops.creates(), 2);
    // A different algorithm is never adopted.
    let mut other = rotation(&ops, &clock, "c");
    other.last_served = None;
    let rsa = other.rotate(KeyType::Rsa2048).await.unwrap();
    assert!(rsa.name.ends_with("/3"));
}

#[tokio::test(start_paused = true)]
async fn a_holder_out_of_lease_does_not_create() {
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    let mut slow = rotation(&ops, &clock, "me");
    // A call timeout as long as the lease: never enough lease left to start the create.
    slow.call_timeout = slow.lease;
    let err = slow.rotate(P256).await.unwrap_err();
    assert!(err.message.contains("held too long"), "{err}");
    assert_eq!(ops.creates(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiters_adopt_the_holders_generation_even_outside_the_reuse_window() {
    let ops = FakeOps::new();
    let clock = Arc::new(TestClock::new(Duration::ZERO));
    let rotations: Vec<_> = (0..4)
        .map(|i| {
            let (ops, clock) = (ops.clone(), clock.clone());
            tokio::spawn(async move {
                let holder = format!("server-{i}");
                let mut rotation = rotation(&ops, &clock, &holder);
                // Shorter than a poll: a waiter never sees the holder's generation as fresh.
                rotation.reuse_window = Duration::from_millis(1);
                rotation.rotate(P256).await.map(|g| g.name)
            })
        })
        .collect();
    let mut served = Vec::new();
    for rotation in rotations {
        served.push(rotation.await.unwrap().unwrap());
    }
    assert_eq!(ops.creates(), 1);
    assert!(served.iter().all(|v| v == &served[0]), "{served:?}");
}

#[tokio::test(start_paused = true)]
async fn a_lease_the_store_does_not_record_counts_from_first_sight() {
    let ops = FakeOps::new();
    ops.store.lock().unwrap().unrecorded = true;
    let clock = TestClock::new(Duration::ZERO);
    // A holder took attempt 0 and died; nobody can tell when.
    ops.plant_lock("lock-0-0", "");
    let started = Instant::now();
    let generation = rotation(&ops, &clock, "me").rotate(P256).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(generation.number, 1);
    assert_eq!(ops.creates(), 1);
    // A full lease (20 s) plus the skew (5 s) after this waiter first saw the lock.
    assert!(
        waited >= Duration::from_secs(25),
        "took over too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(27), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unrecorded_lease_counts_from_the_first_sight_across_abandoned_rotations() {
    let ops = FakeOps::new();
    ops.store.lock().unwrap().unrecorded = true;
    let clock = TestClock::new(Duration::ZERO);
    ops.plant_lock("lock-0-0", "");
    let started = Instant::now();
    // SPIRE gives up on a GenerateKey after 30 s: three calls of at most 10 s each.
    let mut tries = 0;
    let generation = loop {
        tries += 1;
        let mut short = rotation(&ops, &clock, "me");
        short.budget = Duration::from_secs(10);
        match short.rotate(P256).await {
            Ok(generation) => break generation,
            Err(e) => assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}"),
        }
        assert!(tries < 5, "never took over");
    };
    assert_eq!(generation.number, 1);
    assert_eq!(ops.creates(), 1);
    // Lease 20 s + skew 5 s after the first call first saw the lock, not after the last.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(25), "{waited:?}");
    assert!(waited < Duration::from_secs(32), "{waited:?}");
    assert_eq!(tries, 3);
}
