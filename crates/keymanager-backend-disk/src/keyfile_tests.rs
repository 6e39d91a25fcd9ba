use std::os::unix::fs::PermissionsExt;

use super::*;

fn entries(ids: &[&str]) -> BTreeMap<String, Vec<u8>> {
    ids.iter()
        .map(|id| (id.to_string(), format!("secret of {id}").into_bytes()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

/// The name the writer used to choose: `.<name>.tmp-<pid>`.
fn old_predictable_name(dir: &Path) -> PathBuf {
    dir.join(format!(".keys.json.tmp-{}", std::process::id()))
}

#[test]
fn a_symlink_planted_at_the_old_predictable_name_captures_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    let victim = dir.path().join("victim");
    fs::write(&victim, b"").unwrap();
    std::os::unix::fs::symlink(&victim, old_predictable_name(dir.path())).unwrap();

    file.write(&entries(&["x509-CA-A"])).unwrap();

    assert_eq!(
        fs::read(&victim).unwrap(),
        b"",
        "keys written through a planted symlink"
    );
    assert!(fs::symlink_metadata(file.path()).unwrap().is_file());
    assert_eq!(file.read().unwrap(), entries(&["x509-CA-A"]));
}

#[test]
fn a_file_planted_at_the_old_predictable_name_does_not_widen_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    let planted = old_predictable_name(dir.path());
    fs::write(&planted, b"").unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o644)).unwrap();

    file.write(&entries(&["x509-CA-A"])).unwrap();

    assert_eq!(mode(file.path()), 0o600);
    assert_eq!(file.read().unwrap(), entries(&["x509-CA-A"]));
}

#[test]
fn temporary_names_are_random_and_are_what_leftovers_match() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    let a = file.temp_path().unwrap();
    let b = file.temp_path().unwrap();
    assert_ne!(a, b);
    for tmp in [&a, &b] {
        assert_eq!(tmp.parent().unwrap(), dir.path());
        let name = tmp.file_name().unwrap().to_str().unwrap();
        let suffix = name.strip_prefix(".keys.json.tmp-").unwrap();
        assert_eq!(suffix.len(), 32, "{name}");
        assert_ne!(suffix, std::process::id().to_string());
        assert!(is_temp_name(OsStr::new("keys.json"), OsStr::new(name)));
    }
}

#[test]
fn an_existing_file_or_symlink_at_the_temporary_name_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    let victim = dir.path().join("victim");
    fs::write(&victim, b"victim").unwrap();

    let tmp = file.temp_path().unwrap();
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    assert_eq!(
        create_private(&tmp).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert!(fs::symlink_metadata(&tmp).unwrap().is_symlink());
    fs::remove_file(&tmp).unwrap();

    std::os::unix::fs::symlink(dir.path().join("nowhere"), &tmp).unwrap();
    assert_eq!(
        create_private(&tmp).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert!(
        !dir.path().join("nowhere").exists(),
        "dangling symlink followed"
    );
    fs::remove_file(&tmp).unwrap();

    fs::write(&tmp, b"planted").unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        create_private(&tmp).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(fs::read(&tmp).unwrap(), b"planted");
    assert_eq!(mode(&tmp), 0o644);
    assert_eq!(fs::read(&victim).unwrap(), b"victim");
}

#[test]
fn temporary_files_are_exactly_0600_whatever_the_mode_they_start_with() {
    let dir = tempfile::tempdir().unwrap();
    let created = dir.path().join("created");
    drop(create_private(&created).unwrap());
    assert_eq!(mode(&created), 0o600);
    for start in [0o644, 0o400, 0o666] {
        let path = dir.path().join(format!("start-{start:o}"));
        let f = File::create(&path).unwrap();
        f.set_permissions(fs::Permissions::from_mode(start))
            .unwrap();
        ensure_private(&f).unwrap();
        assert_eq!(mode(&path), 0o600, "from {start:o}");
    }
}

#[test]
fn a_failed_write_removes_its_temporary_file_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    // A non-empty directory at the keys path: the rename over it fails.
    let path = dir.path().join("keys.json");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("inside"), b"").unwrap();
    let file = KeyFile::new(path.clone());
    let err = file.write(&entries(&["a"])).unwrap_err();
    assert!(
        err.message.contains("unable to write keys file"),
        "{}",
        err.message
    );
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temporary file left"
    );
    assert!(path.join("inside").exists());
}

#[test]
fn remove_leftovers_removes_only_this_files_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = KeyFile::new(d.join("keys.json"));
    file.write(&entries(&["current"])).unwrap();
    let secret = br#"{"keys":{"rotated":"cm90YXRlZA=="}}"#;
    let ours = [
        ".keys.json.tmp-12345".to_string(), // an earlier version's pid suffix
        ".keys.json.tmp-0123456789abcdef0123456789abcdef".to_string(),
        format!(".keys.json.tmp-{}", std::process::id()),
    ];
    for name in &ours {
        fs::write(d.join(name), secret).unwrap();
    }
    let victim = d.join("victim");
    fs::write(&victim, b"victim").unwrap();
    let not_ours = [
        "keys.json.tmp",                                    // SPIRE's own temporary file
        ".keys.json.tmp-",                                  // no suffix
        ".keys.json.tmp-xyz",                               // not hex
        ".keys.json.tmp-ABCDEF",                            // not our (lowercase) hex
        ".keys.json.tmp-0123456789abcdef0123456789abcdef0", // too long
        ".keys.json.tmp-123.bak",
        ".keys.json.tmp-12 ",
        "keys.json.tmp-123",
        ".keys.json.bak.tmp-123",
        ".other.json.tmp-123",        // another keys file's
        ".keys.json.tmp-123.tmp-456", // keys file `keys.json.tmp-123`'s
        "keys.json.lock",
    ];
    for name in not_ours {
        fs::write(d.join(name), secret).unwrap();
    }
    std::os::unix::fs::symlink(&victim, d.join(".keys.json.tmp-abc")).unwrap();
    fs::create_dir(d.join(".keys.json.tmp-def")).unwrap();

    let mut expected: Vec<PathBuf> = ours.iter().map(|n| d.join(n)).collect();
    expected.sort();
    assert_eq!(file.leftovers().unwrap(), expected);
    assert_eq!(file.remove_leftovers().unwrap(), expected);
    for path in &expected {
        assert!(!path.exists(), "{} not removed", path.display());
    }
    for name in not_ours {
        assert!(d.join(name).exists(), "{name} removed");
    }
    assert!(
        fs::symlink_metadata(d.join(".keys.json.tmp-abc"))
            .unwrap()
            .is_symlink()
    );
    assert!(d.join(".keys.json.tmp-def").is_dir());
    assert_eq!(fs::read(&victim).unwrap(), b"victim");
    assert_eq!(file.read().unwrap(), entries(&["current"]));
    assert!(file.leftovers().unwrap().is_empty());
    assert!(file.remove_leftovers().unwrap().is_empty());
}

#[test]
fn remove_leftovers_without_leftovers_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    assert!(file.remove_leftovers().unwrap().is_empty());
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "lock file created"
    );
    let missing = KeyFile::new(dir.path().join("missing/keys.json"));
    assert!(missing.remove_leftovers().unwrap().is_empty());
}

#[test]
fn remove_leftovers_waits_for_a_writer_holding_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    // Another process's write in progress: it holds the lock and its temporary file exists.
    let lock = file.lock_exclusive().unwrap();
    let in_progress = file.temp_path().unwrap();
    drop(create_private(&in_progress).unwrap());
    let cleaner = {
        let file = file.clone();
        std::thread::spawn(move || file.remove_leftovers().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        in_progress.exists(),
        "removed under a writer holding the lock"
    );
    assert!(!cleaner.is_finished());
    drop(lock);
    assert_eq!(cleaner.join().unwrap(), vec![in_progress.clone()]);
    assert!(!in_progress.exists());
}

#[test]
fn the_lock_is_an_flock_on_a_private_sidecar_lock_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    assert_eq!(file.lock_path(), dir.path().join("keys.json.lock"));
    let lock = file.lock_exclusive().unwrap();
    assert_eq!(mode(&file.lock_path()), 0o600);
    assert!(
        !file.path().exists(),
        "locking must not create the keys file"
    );

    // Any other open file description of the lock file is excluded, as another process's
    // flock would be (an fcntl lock would not conflict within one process).
    let other = File::open(file.lock_path()).unwrap();
    assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
    let inode = fs::metadata(file.lock_path()).unwrap().ino();
    let locks = fs::read_to_string("/proc/locks").unwrap();
    assert!(
        locks.lines().any(|line| line.contains("FLOCK")
            && line.contains(" WRITE ")
            && line.contains(&format!(":{inode} "))),
        "no exclusive flock on inode {inode} in /proc/locks:\n{locks}"
    );
    drop(lock);
    other.try_lock().unwrap();
    other.unlock().unwrap();
    drop(other);

    // The lock file stays: removing it would let two writers lock different inodes.
    assert!(file.lock_path().exists());
}

#[test]
fn a_symlink_at_the_lock_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    let victim = dir.path().join("victim");
    std::os::unix::fs::symlink(&victim, file.lock_path()).unwrap();
    let err = file.lock_exclusive().unwrap_err();
    assert!(
        err.message.contains("cannot lock keys file"),
        "{}",
        err.message
    );
    assert!(err.message.contains("keys.json.lock"), "{}", err.message);
    assert!(!victim.exists());
    let err = file.update(|_| Ok(())).unwrap_err();
    assert!(
        err.message.contains("unable to write keys file"),
        "{}",
        err.message
    );
}

#[test]
fn a_second_writer_rereads_the_first_writers_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    // Two servers on one file, each with its own KeyFile.
    let first = KeyFile::new(path.clone());
    let second = KeyFile::new(path.clone());
    let (in_update, first_is_in) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        first
            .update(|entries| {
                entries.insert("x509-CA-A".into(), b"first".to_vec());
                in_update.send(()).unwrap();
                // The second writer starts now and must wait for this write.
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            })
            .unwrap()
    });
    first_is_in.recv().unwrap();
    second
        .update(|entries| {
            assert_eq!(
                entries.get("x509-CA-A").map(Vec::as_slice),
                Some(&b"first"[..])
            );
            entries.insert("x509-CA-B".into(), b"second".to_vec());
            Ok(())
        })
        .unwrap();
    writer.join().unwrap();
    let stored = KeyFile::new(path).read().unwrap();
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        ["x509-CA-A", "x509-CA-B"]
    );
}

#[test]
fn concurrent_writers_on_one_file_lose_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let file = KeyFile::new(path.clone());
            std::thread::spawn(move || {
                for i in 0..15 {
                    file.update(|entries| {
                        entries.insert(format!("w{w}-k{i}"), vec![w, i]);
                        Ok(())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let file = KeyFile::new(path);
    assert_eq!(file.read().unwrap().len(), 6 * 15);
    assert!(file.leftovers().unwrap().is_empty());
}

#[test]
fn a_failed_change_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    file.write(&entries(&["a"])).unwrap();
    let before = fs::read(file.path()).unwrap();
    let err = file
        .update(|entries| -> Result<(), BackendError> {
            entries.clear();
            Err(BackendError::new(BackendErrorKind::Internal, "no"))
        })
        .unwrap_err();
    assert_eq!(err.message, "no");
    assert_eq!(fs::read(file.path()).unwrap(), before);
}

/// Collects what `tracing` logs on this thread.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_directory_fsync_after_the_rename_counts_as_written_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = KeyFile::new(dir.path().join("keys.json"));
    file.write(&entries(&["old"])).unwrap();

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .finish();
    let result = tracing::subscriber::with_default(subscriber, || {
        file.write_with(&entries(&["new"]), |_| {
            Err(std::io::Error::other("injected fsync failure"))
        })
    });

    result.unwrap();
    assert_eq!(file.read().unwrap(), entries(&["new"]));
    assert!(file.leftovers().unwrap().is_empty());
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains(&file.path().display().to_string()), "{log}");
    assert!(log.contains("durability is not guaranteed"), "{log}");
    assert!(log.contains("injected fsync failure"), "{log}");
}
