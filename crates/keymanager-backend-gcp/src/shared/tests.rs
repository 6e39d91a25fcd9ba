use std::sync::{Arc, Mutex};

use super::*;

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
    versions: Vec<VersionInfo>,
    locks: HashMap<String, HashMap<String, String>>,
    creates: usize,
    fail_creates: bool,
}

/// Cloud KMS in memory; every call takes 20 ms so that concurrent rotations interleave.
struct FakeOps {
    store: Mutex<Store>,
    clock: TestClock,
}

impl FakeOps {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(Store::default()),
            clock: TestClock::new(Duration::ZERO),
        })
    }

    fn plant_lock(&self, lock_id: &str, expires: &str) {
        self.store.lock().unwrap().locks.insert(
            lock_id.to_string(),
            HashMap::from([
                (naming::LABEL_LOCK_EXPIRES.to_string(), expires.to_string()),
                (naming::LABEL_LOCK_HOLDER.to_string(), "crashed".to_string()),
            ]),
        );
    }

    fn creates(&self) -> usize {
        self.store.lock().unwrap().creates
    }
}

async fn latency() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[async_trait]
impl SharedOps for FakeOps {
    async fn versions(&self, _crypto_key: &str) -> Result<Vec<VersionInfo>, BackendError> {
        latency().await;
        Ok(self.store.lock().unwrap().versions.clone())
    }
    async fn create_lock(
        &self,
        lock_id: &str,
        labels: HashMap<String, String>,
    ) -> Result<bool, BackendError> {
        latency().await;
        let mut store = self.store.lock().unwrap();
        if store.locks.contains_key(lock_id) {
            return Ok(false);
        }
        store.locks.insert(lock_id.to_string(), labels);
        Ok(true)
    }
    async fn lock_labels(&self, lock_id: &str) -> Result<HashMap<String, String>, BackendError> {
        latency().await;
        Ok(self.store.lock().unwrap().locks[lock_id].clone())
    }
    async fn release_lock(&self, lock_id: &str) {
        latency().await;
        if let Some(labels) = self.store.lock().unwrap().locks.get_mut(lock_id) {
            labels.insert(naming::LABEL_LOCK_EXPIRES.into(), RELEASED.into());
        }
    }
    async fn set_template_algorithm(
        &self,
        _crypto_key: &str,
        _algorithm: &Algorithm,
    ) -> Result<(), BackendError> {
        latency().await;
        Ok(())
    }
    async fn create_version(&self, crypto_key: &str) -> Result<String, BackendError> {
        latency().await;
        let mut store = self.store.lock().unwrap();
        if store.fail_creates {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "backend error",
            ));
        }
        store.creates += 1;
        let number = store.versions.iter().map(|v| v.number).max().unwrap_or(0) + 1;
        let name = format!("{crypto_key}/cryptoKeyVersions/{number}");
        store.versions.push(VersionInfo {
            name: name.clone(),
            number,
            live: true,
            algorithm: Algorithm::EcSignP256Sha256,
            created: Some(self.clock.now()),
        });
        Ok(name)
    }
}

const KEY: &str = "projects/p/locations/l/keyRings/r/cryptoKeys/jwt";

fn rotation<'a>(ops: &'a FakeOps, clock: &'a TestClock, holder: &'a str) -> SharedRotation<'a> {
    SharedRotation {
        ops,
        clock,
        crypto_key: KEY,
        td_hash: "td",
        holder,
        lease: Duration::from_secs(20),
        skew: Duration::from_secs(5),
        reuse_window: Duration::from_secs(15 * 60),
        budget: Duration::from_secs(120),
        call_timeout: Duration::from_secs(8),
        poll: Duration::from_millis(200),
        last_served: None,
    }
}

async fn rotate(
    ops: Arc<FakeOps>,
    clock: Arc<TestClock>,
    holder: String,
) -> Result<String, BackendError> {
    rotation(&ops, &clock, &holder)
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
}

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
    ops.plant_lock(
        &naming::lock_crypto_key_id(KEY, 0, 0),
        &stamp_text(lease_end),
    );
    let started = Instant::now();
    let version = rotation(&ops, &clock, "me")
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(version.ends_with("/cryptoKeyVersions/1"));
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
        ops.plant_lock(&naming::lock_crypto_key_id(KEY, 0, 0), expires);
        let started = Instant::now();
        rotation(&ops, &clock, "me")
            .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "{expires:?}");
    }
    // A lease that ends in the year 9999 is respected, but only until the budget ends.
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    ops.plant_lock(&naming::lock_crypto_key_id(KEY, 0, 0), "253402300799");
    let started = Instant::now();
    let err = rotation(&ops, &clock, "me")
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap_err();
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
    let err = rotation(&ops, &clock, "me")
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap_err();
    assert_eq!(err.message, "backend error");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_fresh_version_of_another_server_is_reused_but_not_one_served_here() {
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    let first = rotation(&ops, &clock, "a")
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap();
    // Another server rotating moments later adopts it.
    let adopted = rotation(&ops, &clock, "b")
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap();
    assert_eq!(adopted, first);
    assert_eq!(ops.creates(), 1);
    // The server that served it rotates for real.
    let mut again = rotation(&ops, &clock, "a");
    again.last_served = Some(1);
    let second = again
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap();
    assert_ne!(second, first);
    assert_eq!(ops.creates(), 2);
    // A different algorithm is never adopted.
    let mut other = rotation(&ops, &clock, "c");
    other.last_served = None;
    let rsa = other
        .rotate(
            &Algorithm::RsaSignPkcs12048Sha256,
            Algorithm::EcSignP256Sha256,
        )
        .await
        .unwrap();
    assert!(rsa.ends_with("/3"));
}

#[tokio::test(start_paused = true)]
async fn a_holder_out_of_lease_does_not_create() {
    let ops = FakeOps::new();
    let clock = TestClock::new(Duration::ZERO);
    let mut slow = rotation(&ops, &clock, "me");
    // A call timeout as long as the lease: never enough lease left to start the create.
    slow.call_timeout = slow.lease;
    let err = slow
        .rotate(&Algorithm::EcSignP256Sha256, Algorithm::EcSignP256Sha256)
        .await
        .unwrap_err();
    assert!(err.message.contains("held too long"), "{err}");
    assert_eq!(ops.creates(), 0);
}
