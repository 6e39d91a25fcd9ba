//! The keys file: SPIRE's disk KeyManager JSON format, written atomically under a
//! cross-process lock.
//!
//! Files beside the keys file `<dir>/<name>`:
//! - `<dir>/.<name>.tmp-<32 hex digits>`: the temporary file of a write in progress, created
//!   exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`) with mode 0600 under a random name, then
//!   fsynced and renamed over the keys file. A process killed in between leaves it behind;
//!   [`KeyFile::remove_leftovers`] removes such files (and the `.<name>.tmp-<pid>` files of
//!   earlier versions, which used the process id instead of a random suffix).
//! - `<dir>/<name>.lock`: an empty file, created 0600 and never removed, on which writers take
//!   an exclusive `flock`. The keys file itself cannot carry the lock: every write replaces
//!   it with a new inode, so a writer that waited on the old inode would not exclude one that
//!   opened the new file.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keymanager_engine::{BackendError, BackendErrorKind};

/// `{"keys": {"<id>": "<base64 PKCS#8 DER>"}}`; Go encodes `[]byte` as padded base64.
#[derive(serde::Serialize, serde::Deserialize)]
struct FileFormat {
    keys: BTreeMap<String, String>,
}

/// Mode of the keys file, its temporary files and the lock file (SPIRE's private file mode).
const PRIVATE_MODE: u32 = 0o600;
/// Between the keys file name and the random suffix of a temporary file.
const TEMP_MARKER: &[u8] = b".tmp-";
/// Random bytes in a temporary file name (hex encoded: twice as many digits).
const TEMP_RANDOM_BYTES: usize = 16;

/// The keys file at one path.
#[derive(Clone, Debug)]
pub struct KeyFile {
    path: PathBuf,
}

/// An exclusive advisory lock (`flock(LOCK_EX)`) on the keys file's `<path>.lock`, held until
/// dropped. It excludes every other holder, in this process or another, that locks the same
/// lock file.
#[must_use = "the lock is released when this value is dropped"]
#[derive(Debug)]
pub struct KeyFileLock {
    _file: File,
}

impl KeyFile {
    /// A keys file at `path`; nothing is read until [`KeyFile::read`].
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file: the keys file's path with `.lock` appended.
    pub fn lock_path(&self) -> PathBuf {
        let mut path = OsString::from(self.path.as_os_str());
        path.push(".lock");
        PathBuf::from(path)
    }

    /// Reads every entry (id → PKCS#8 DER). A missing file is empty; anything else that
    /// goes wrong is an error naming the path. Needs no lock: writes replace the file
    /// atomically, so a reader sees either the old or the new file.
    pub fn read(&self) -> Result<BTreeMap<String, Vec<u8>>, BackendError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.error("cannot read keys file", e)),
        };
        let parsed: FileFormat = serde_json::from_slice(&bytes).map_err(|e| {
            BackendError::with_source(
                BackendErrorKind::Internal,
                format!(
                    "keys file {} is corrupt (refusing to start with an empty key set)",
                    self.path.display()
                ),
                e,
            )
        })?;
        parsed
            .keys
            .into_iter()
            .map(|(id, b64)| {
                STANDARD
                    .decode(b64.as_bytes())
                    .map(|der| (id.clone(), der))
                    .map_err(|e| {
                        BackendError::new(
                            BackendErrorKind::Internal,
                            format!(
                                "keys file {} is corrupt: key {id:?} is not base64: {e}",
                                self.path.display()
                            ),
                        )
                    })
            })
            .collect()
    }

    /// Read-modify-write under the exclusive lock: locks, reads the file as it is now (so
    /// keys another process wrote since this one loaded are kept), applies `change`, writes
    /// the result and unlocks. If `change` or the write fails, the file is untouched.
    ///
    /// Blocks while another writer holds the lock. Must not be called while this thread
    /// holds a [`KeyFileLock`] for the same file (it would wait for itself).
    pub fn update<R>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Vec<u8>>) -> Result<R, BackendError>,
    ) -> Result<R, BackendError> {
        let _lock = self.lock("unable to write keys file")?;
        let mut entries = self.read()?;
        let result = change(&mut entries)?;
        self.write(&entries)?;
        Ok(result)
    }

    /// Takes the exclusive lock on [`KeyFile::lock_path`] (creating it 0600 if missing),
    /// blocking while another holder has it; released when the returned value is dropped.
    /// For callers that need more than [`KeyFile::update`]: hold it around `read` … `write`.
    /// Not reentrant: a second lock of the same file from the same thread waits forever.
    pub fn lock_exclusive(&self) -> Result<KeyFileLock, BackendError> {
        self.lock("cannot lock keys file")
    }

    /// Replaces the file atomically: write a temporary file beside it (random name, created
    /// exclusively without following symlinks, mode 0600), fsync, rename over the old one,
    /// fsync the directory. A crash leaves either the old or the new file, plus possibly the
    /// temporary file ([`KeyFile::remove_leftovers`]).
    ///
    /// Does not lock: call it under [`KeyFile::lock_exclusive`], or use [`KeyFile::update`].
    ///
    /// Once the rename has succeeded the new file is in place and is what a restart loads,
    /// so a failure to fsync the directory after it is logged as a warning (the new file
    /// may not survive a power loss) and the write counts as done.
    pub fn write(&self, entries: &BTreeMap<String, Vec<u8>>) -> Result<(), BackendError> {
        self.write_with(entries, sync_dir)
    }

    /// [`KeyFile::write`] with the directory fsync as a parameter, for tests.
    fn write_with(
        &self,
        entries: &BTreeMap<String, Vec<u8>>,
        sync_dir: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), BackendError> {
        let format = FileFormat {
            keys: entries
                .iter()
                .map(|(id, der)| (id.clone(), STANDARD.encode(der)))
                .collect(),
        };
        let json = serde_json::to_vec(&format)
            .map_err(|e| self.error("cannot encode keys file", std::io::Error::other(e)))?;
        let tmp = self
            .temp_path()
            .map_err(|e| self.error("unable to write keys file", e))?;
        let file = create_private(&tmp).map_err(|e| {
            self.error(
                "unable to write keys file",
                with_path("cannot create temporary file", &tmp, e),
            )
        })?;
        // From here on the temporary file is ours: remove it if anything fails.
        let written = (|| {
            let mut file = file;
            file.write_all(&json)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.error("unable to write keys file", e));
        }
        let dir = self.dir();
        if let Err(e) = sync_dir(&dir) {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "keys file {} was replaced but fsync of its directory {} failed: the new \
                 file is in use, but durability is not guaranteed (after a power loss the \
                 previous file may come back)",
                self.path.display(),
                dir.display(),
            );
        }
        Ok(())
    }

    /// Temporary files left beside the keys file by interrupted writes: regular files named
    /// `.<name>.tmp-<suffix>` where the suffix is 1 to 32 lowercase hex digits (this
    /// version's random suffix, or an earlier version's process id). Nothing else matches:
    /// not other keys files' temporaries, not SPIRE's `<name>.tmp`, not symlinks or
    /// directories. A missing directory has none.
    pub fn leftovers(&self) -> Result<Vec<PathBuf>, BackendError> {
        let Some(name) = self.path.file_name() else {
            return Ok(Vec::new());
        };
        let dir = self.dir();
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(self.error(
                    "cannot look for leftover temporary files of keys file",
                    with_path("cannot list", &dir, e),
                ));
            }
        };
        let mut found = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| {
                self.error(
                    "cannot look for leftover temporary files of keys file",
                    with_path("cannot list", &dir, e),
                )
            })?;
            if !is_temp_name(name, &entry.file_name()) {
                continue;
            }
            // DirEntry::file_type does not follow symlinks.
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                found.push(entry.path());
            }
        }
        found.sort();
        Ok(found)
    }

    /// Removes the [`KeyFile::leftovers`] of interrupted writes: each may hold private keys
    /// that have since been rotated out of the keys file. Call once at start-up, before or
    /// after [`KeyFile::read`], not while holding a [`KeyFileLock`]. Takes the lock (only
    /// when there is something to remove), so a temporary file of another process's write
    /// in progress is never removed. Returns what it removed; each removal is logged.
    pub fn remove_leftovers(&self) -> Result<Vec<PathBuf>, BackendError> {
        if self.leftovers()?.is_empty() {
            return Ok(Vec::new());
        }
        let _lock = self.lock("cannot remove leftover temporary files of keys file")?;
        let mut removed = Vec::new();
        for path in self.leftovers()? {
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::warn!(
                        path = %path.display(),
                        "removed temporary file {} left by an interrupted write of keys file {}",
                        path.display(),
                        self.path.display(),
                    );
                    removed.push(path);
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(self.error(
                        "cannot remove leftover temporary files of keys file",
                        with_path("cannot remove", &path, e),
                    ));
                }
            }
        }
        if !removed.is_empty() {
            let dir = self.dir();
            if let Err(e) = sync_dir(&dir) {
                tracing::warn!(
                    error = %e,
                    "fsync of directory {} after removing leftover temporary files failed; \
                     they may reappear after a power loss and will be removed again",
                    dir.display(),
                );
            }
        }
        Ok(removed)
    }

    fn lock(&self, what: &str) -> Result<KeyFileLock, BackendError> {
        let lock_path = self.lock_path();
        let file = open_lock_file(&lock_path)
            .map_err(|e| self.error(what, with_path("cannot open lock file", &lock_path, e)))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                tracing::info!(
                    "waiting for the lock on {} held by another writer of keys file {}",
                    lock_path.display(),
                    self.path.display(),
                );
                file.lock()
                    .map_err(|e| self.error(what, with_path("cannot lock", &lock_path, e)))?;
            }
            Err(TryLockError::Error(e)) => {
                return Err(self.error(what, with_path("cannot lock", &lock_path, e)));
            }
        }
        Ok(KeyFileLock { _file: file })
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// A fresh temporary path beside the keys file: `.<name>.tmp-<32 random hex digits>`.
    fn temp_path(&self) -> std::io::Result<PathBuf> {
        let name = self.path.file_name().ok_or_else(|| {
            std::io::Error::new(ErrorKind::InvalidInput, "the path has no file name")
        })?;
        let mut random = [0u8; TEMP_RANDOM_BYTES];
        getrandom::fill(&mut random).map_err(std::io::Error::other)?;
        let mut temp = OsString::from(".");
        temp.push(name);
        temp.push(OsStr::from_bytes(TEMP_MARKER));
        for byte in random {
            temp.push(format!("{byte:02x}"));
        }
        Ok(self.dir().join(temp))
    }

    fn error(&self, what: &str, e: std::io::Error) -> BackendError {
        BackendError::with_source(
            BackendErrorKind::Internal,
            format!("{what} {}", self.path.display()),
            e,
        )
    }
}

/// Whether `candidate` is `.<name>.tmp-<1 to 32 lowercase hex digits>`.
fn is_temp_name(name: &OsStr, candidate: &OsStr) -> bool {
    let candidate = candidate.as_bytes();
    let Some(rest) = candidate.strip_prefix(b".") else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(name.as_bytes()) else {
        return false;
    };
    let Some(suffix) = rest.strip_prefix(TEMP_MARKER) else {
        return false;
    };
    (1..=2 * TEMP_RANDOM_BYTES).contains(&suffix.len())
        && suffix
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Creates `path` as a new private file: fails if anything (file, symlink, …) is already
/// there. The mode asked for is 0600; the umask can only narrow it, and the result is set
/// and checked to be exactly 0600 (the owner must be able to read the keys file back).
fn create_private(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if let Err(e) = ensure_private(&file) {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Makes an open file's mode exactly 0600 (through the descriptor, not the path).
fn ensure_private(file: &File) -> std::io::Result<()> {
    let mode = |file: &File| -> std::io::Result<u32> {
        Ok(file.metadata()?.permissions().mode() & 0o7777)
    };
    if mode(file)? != PRIVATE_MODE {
        file.set_permissions(fs::Permissions::from_mode(PRIVATE_MODE))?;
        let now = mode(file)?;
        if now != PRIVATE_MODE {
            return Err(std::io::Error::other(format!(
                "mode is {now:o} after setting it to {PRIVATE_MODE:o}"
            )));
        }
    }
    Ok(())
}

/// Opens (creating it 0600 if missing) the lock file, without following a symlink.
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(PRIVATE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn with_path(what: &str, path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
#[path = "keyfile_tests.rs"]
mod tests;
