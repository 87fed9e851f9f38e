//! A small real filesystem for the spool, so a test can fill a disk for real: a tmpfs of a
//! given size, mounted by the test (as root, as CI runs) and unmounted when dropped, also
//! when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `2m`, `400m`) at a directory of its own.
    pub fn mount(size: &str) -> Tmpfs {
        let dir =
            std::env::temp_dir().join(format!("relay-test-disk-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("the mount point can be created");
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        match mounted {
            Ok(output) if output.status.success() => Tmpfs { dir },
            Ok(output) => {
                let _ = std::fs::remove_dir(&dir);
                panic!(
                    "cannot mount a {size} tmpfs at {} ({}): the full-disk and memory tests mount \
                     a small filesystem and need root (or CAP_SYS_ADMIN); run them as root, as \
                     CI does",
                    dir.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                )
            }
            Err(err) => {
                let _ = std::fs::remove_dir(&dir);
                panic!("cannot run mount ({err}): install util-linux's mount")
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Takes every byte left with a file of its own; returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("the filler file can be created");
        let chunk = [0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a relay process that is still being reaped may hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
