//! A scratch directory and a runtime per fuzzing process.
//!
//! AFL forks a fresh child every thousand inputs and never runs destructors, so a
//! `TempDir` per child would leak one directory each time: the directory is named after
//! the parent (AFL's fork server, or the test runner's cargo) and emptied when a child
//! starts, so one directory serves a whole campaign. It lives on tmpfs where there is one,
//! as the disk backend fsyncs every write.

use std::path::{Path, PathBuf};

/// Creates (emptied) `<tmp>/kms-keymanager-fuzz-<parent pid>-<target>`.
pub(crate) fn fresh(target: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "kms-keymanager-fuzz-{}-{target}",
        std::os::unix::process::parent_id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the scratch directory can be created");
    dir
}

/// A single-threaded runtime: created after AFL's fork, so no worker thread is lost.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}
