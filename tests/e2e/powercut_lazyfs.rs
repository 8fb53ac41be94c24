//! The LazyFS harness itself (tests/lazyfs.rs): a clear-cache keeps what was fsynced and drops
//! what was not, as a power cut does, and the mount is really gone afterwards.

use std::io::Write;

use edge_e2e::lazyfs::{LazyFs, is_mounted};

#[test]
fn clear_cache_drops_only_unsynced_data() {
    let mut fs = LazyFs::mount().expect("LazyFS mounts");
    let mount = fs.path().to_owned();
    assert!(is_mounted(&mount).unwrap(), "{} is mounted", mount.display());

    let synced: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut a = std::fs::File::create(mount.join("a")).unwrap();
    a.write_all(&synced).unwrap();
    a.sync_all().unwrap();
    drop(a);
    let mut b = std::fs::File::create(mount.join("b")).unwrap();
    b.write_all(&[0x5a; 100_000]).unwrap();
    drop(b);
    // Before the cut LazyFS serves its cache: both files read back whole.
    assert_eq!(std::fs::read(mount.join("b")).unwrap().len(), 100_000);

    fs.clear_cache().expect("clear-cache confirmed");

    assert!(
        std::fs::read(mount.join("a")).unwrap() == synced,
        "the fsynced file changed across the cut"
    );
    let b = std::fs::read(mount.join("b")).unwrap_or_default();
    assert!(
        b.is_empty(),
        "the unsynced file kept {} bytes across the cut",
        b.len()
    );

    // A second cut on the same mount works too (the notifier fifo is reused).
    std::fs::write(mount.join("c"), b"never synced").unwrap();
    fs.clear_cache().expect("second clear-cache confirmed");
    assert!(std::fs::read(mount.join("c")).unwrap_or_default().is_empty());

    drop(fs);
    assert!(!is_mounted(&mount).unwrap(), "{} still mounted", mount.display());
    assert!(!mount.exists(), "{} not removed", mount.display());
}

#[test]
fn a_panicking_test_leaves_no_mount() {
    let mount = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let fs = LazyFs::mount().expect("LazyFS mounts");
        *mount.lock().unwrap() = Some(fs.path().to_owned());
        std::fs::write(fs.path().join("x"), b"x").unwrap();
        panic!("test failure while mounted");
    });
    assert!(result.is_err());
    let mount = mount.into_inner().unwrap().expect("mounted before the panic");
    assert!(!is_mounted(&mount).unwrap(), "{} still mounted", mount.display());
}
