//! A tmpfs of a chosen size for the disk-full tests (they need root to mount one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Unmounts the tmpfs when the test ends, even by panic.
pub struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        // A just-exited child can keep the mount busy for a moment: retry, then detach it
        // lazily so no mount outlives the test.
        for _ in 0..20 {
            let unmounted = Command::new("umount").arg(&self.0).status();
            if unmounted.is_ok_and(|status| status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let lazy = Command::new("umount").arg("-l").arg(&self.0).status();
        if !lazy.is_ok_and(|status| status.success()) {
            eprintln!(
                "!!! could not unmount the test tmpfs at {} !!!",
                self.0.display()
            );
        }
    }
}

/// Mounts a tmpfs of `size` on `at`, or says why it cannot.
pub fn mount_tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
    let output = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if output.status.success() {
        Ok(Mount(at.to_path_buf()))
    } else {
        Err(format!(
            "mount -t tmpfs failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
