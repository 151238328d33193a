//! Private temporary folders for tests, removed on drop.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A private (0700) temporary folder, removed with what it holds on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new folder in the system's temporary folder.
    pub fn new(tag: &str) -> TempDir {
        TempDir::under(&std::env::temp_dir(), tag)
    }

    /// A new folder below `base`, named after `tag`, this process and a
    /// count (tests of one process run at once).
    pub fn under(base: &Path, tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = base.join(format!("vub-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&p)
            .expect("creating a temporary folder");
        TempDir(p)
    }

    /// A path inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A new image file `name` of `size` bytes (sparse) in the folder.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("creating an image");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_temp_dir_is_private_and_goes_with_its_owner() {
        let d = TempDir::new("private");
        let img = d.image("x.img", 4096);
        let mode = fs::metadata(&d.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        assert_eq!(fs::metadata(&img).unwrap().len(), 4096);
        let p = d.0.clone();
        drop(d);
        assert!(!p.exists());
    }
}
