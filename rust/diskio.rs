//! The disk tier's reads: model files opened once, layer-sized positioned reads straight into
//! their destination, with direct I/O (no page cache, no host copy) where the file system
//! allows it and buffered reads otherwise.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result, Status};
use crate::faults::{self, Fault};
use crate::gguf::FileStamp;

pub use crate::layout::DIRECT_ALIGNMENT;

struct OpenFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    /// A read-only mapping used only to ask which pages the page cache holds (`mincore`).
    mapping: Option<Mapping>,
    /// Direct reads failed once at run time; use buffered reads from then on.
    direct_failed: AtomicBool,
    /// Buffered reads cannot skip uncached pages here (`RWF_NOWAIT`): ask `mincore`.
    nowait_unsupported: AtomicBool,
}

struct Mapping {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and only passed to `mincore`, never dereferenced.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File) -> Option<Mapping> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a private read-only mapping of an open file; unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        (base != libc::MAP_FAILED).then_some(Mapping { base, len })
    }

    /// Fraction of the pages of `offset..offset+len` that the page cache holds.
    fn cached_fraction(&self, offset: u64, len: u64) -> f64 {
        let page = 4096u64;
        let start = offset - offset % page;
        let end = (offset + len).min(self.len as u64);
        if end <= start {
            return 0.0;
        }
        let pages = (end - start).div_ceil(page) as usize;
        let mut residency = vec![0u8; pages];
        // SAFETY: the range lies inside the mapping and `residency` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                (self.base as *mut u8).add(start as usize).cast(),
                (end - start) as usize,
                residency.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return 0.0;
        }
        residency.iter().filter(|&&r| r & 1 == 1).count() as f64 / pages as f64
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A model file a registry streams from, with the stamp it had when its tensors were read.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    pub stamp: Option<FileStamp>,
}

/// The model files of a registry, open for reading from any thread.
pub struct FileSet {
    files: Vec<OpenFile>,
}

/// A failed read: the error, and the file offset where the data stopped.
#[derive(Debug)]
pub struct ReadFailure {
    pub error: Error,
    pub offset: u64,
}

impl FileSet {
    /// Opens every file; one that is no longer the file its tensors were read from (another
    /// file at the path, or the same one rewritten) is refused: its offsets may be wrong.
    pub fn open(model_files: &[ModelFile]) -> Result<FileSet> {
        let mut files = Vec::with_capacity(model_files.len());
        for model_file in model_files {
            let path = &model_file.path;
            let (buffered, stamp) = crate::gguf::open_regular(path)?;
            if let Some(registered) = &model_file.stamp {
                let changes = stamp.changes_since(registered);
                if !changes.is_empty() {
                    return Err(Error::new(
                        Status::Io,
                        format!(
                            "{}: the model file changed since its tensors were registered ({changes}); register it again",
                            path.display()
                        ),
                    ));
                }
            }
            let direct = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok();
            if direct.is_none() {
                log::warn!(
                    "{}: direct I/O is not available on this file system; using buffered reads",
                    path.display()
                );
            }
            let mapping = Mapping::new(&buffered);
            files.push(OpenFile {
                path: path.clone(),
                buffered,
                direct,
                mapping,
                direct_failed: AtomicBool::new(false),
                nowait_unsupported: AtomicBool::new(false),
            });
        }
        Ok(FileSet { files })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn path(&self, file: u32) -> Option<&Path> {
        self.files.get(file as usize).map(|f| f.path.as_path())
    }

    /// Whether reads from `file` currently go around the page cache.
    pub fn direct(&self, file: u32) -> bool {
        self.files
            .get(file as usize)
            .is_some_and(|f| f.direct.is_some() && !f.direct_failed.load(Ordering::Relaxed))
    }

    /// Reads `dst.len()` bytes at `offset` of `file`; at least `needed` of them must exist
    /// (the rest may lie past the end of the file: alignment padding of the last layer).
    pub fn read(
        &self,
        file: u32,
        offset: u64,
        dst: &mut [u8],
        needed: u64,
    ) -> std::result::Result<(), ReadFailure> {
        let fail = |status, message: String, at| ReadFailure {
            error: Error::new(status, message),
            offset: at,
        };
        let f = self.files.get(file as usize).ok_or_else(|| {
            fail(
                Status::Internal,
                format!("no open model file {file}"),
                offset,
            )
        })?;
        if faults::should_fail(Fault::FileRead) {
            return Err(fail(
                Status::Io,
                format!(
                    "{}: injected read error at offset {offset}",
                    f.path.display()
                ),
                offset,
            ));
        }
        // What the page cache already holds is copied from there, without waiting for the
        // disk; the rest comes straight from the disk (direct I/O, from an aligned point),
        // so cached bytes are never read twice and uncached ones never go through the cache.
        let mut got = self.read_cached(f, offset, dst);
        if got < dst.len() {
            let start = got - got % DIRECT_ALIGNMENT as usize;
            let rest = &mut dst[start..];
            let aligned = (offset + start as u64) % DIRECT_ALIGNMENT == 0
                && rest.len() as u64 % DIRECT_ALIGNMENT == 0
                && rest.as_ptr() as u64 % DIRECT_ALIGNMENT == 0;
            if let (Some(direct), true, false) =
                (&f.direct, aligned, f.direct_failed.load(Ordering::Relaxed))
            {
                match read_fully(direct, offset + start as u64, rest) {
                    Ok(n) => got = got.max(start + n),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        if !f.direct_failed.swap(true, Ordering::Relaxed) {
                            log::warn!(
                                "{}: direct reads refused ({e}); using buffered reads",
                                f.path.display()
                            );
                        }
                    }
                    Err(e) => {
                        return Err(fail(
                            Status::Io,
                            format!("{}: read at offset {offset}: {e}", f.path.display()),
                            offset,
                        ))
                    }
                }
            }
        }
        if got < dst.len() {
            got += read_fully(&f.buffered, offset + got as u64, &mut dst[got..]).map_err(|e| {
                fail(
                    Status::Io,
                    format!("{}: read at offset {offset}: {e}", f.path.display()),
                    offset,
                )
            })?;
        }
        if (got as u64) < needed {
            let at = offset + got as u64;
            return Err(fail(
                Status::Io,
                format!(
                    "{}: short read at offset {at}: the file ended {} bytes early (truncated?)",
                    f.path.display(),
                    needed - got as u64
                ),
                at,
            ));
        }
        Ok(())
    }
}

impl FileSet {
    /// Copies the leading part of `dst` that the page cache holds (a buffered read that does
    /// not wait for the disk, `RWF_NOWAIT`); returns its length. Where the kernel or file
    /// system cannot do that, asks the page cache which pages it holds (`mincore`) and reads
    /// everything buffered when most are there.
    fn read_cached(&self, f: &OpenFile, offset: u64, dst: &mut [u8]) -> usize {
        use std::os::fd::AsRawFd;
        // A cold start goes to the disk directly: a buffered read, even one that does not
        // wait, starts the kernel's readahead of the pages it misses, which would then be
        // read twice from the disk.
        let first_cached = f
            .mapping
            .as_ref()
            .is_none_or(|m| m.cached_fraction(offset, 1) > 0.0);
        if !first_cached {
            return 0;
        }
        if !f.nowait_unsupported.load(Ordering::Relaxed) {
            let mut got = 0usize;
            while got < dst.len() {
                let rest = &mut dst[got..];
                let iov = libc::iovec {
                    iov_base: rest.as_mut_ptr().cast(),
                    iov_len: rest.len(),
                };
                // SAFETY: one iovec over `rest`, writable for its length; a valid descriptor.
                let n = unsafe {
                    libc::preadv2(
                        f.buffered.as_raw_fd(),
                        &iov,
                        1,
                        (offset + got as u64) as libc::off_t,
                        libc::RWF_NOWAIT,
                    )
                };
                if n > 0 {
                    got += n as usize;
                    continue;
                }
                if n == 0 {
                    break; // the end of the file
                }
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                        f.nowait_unsupported.store(true, Ordering::Relaxed);
                        return self.read_if_mostly_cached(f, offset, dst);
                    }
                    // EAGAIN: the next page is not cached; errors are the full read's to report.
                    _ => break,
                }
            }
            return got;
        }
        self.read_if_mostly_cached(f, offset, dst)
    }

    fn read_if_mostly_cached(&self, f: &OpenFile, offset: u64, dst: &mut [u8]) -> usize {
        let cached = f
            .mapping
            .as_ref()
            .is_some_and(|m| m.cached_fraction(offset, dst.len() as u64) > 0.5);
        if cached {
            read_fully(&f.buffered, offset, dst).unwrap_or(0)
        } else {
            0
        }
    }
}

/// Reads until `dst` is full or the file ends; returns the bytes read.
fn read_fully(file: &File, offset: u64, dst: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < dst.len() {
        match file.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Drops a file's pages from the page cache (for cold-cache measurements).
pub fn drop_page_cache(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path.display(), e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; advice only.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::new(
            Status::Io,
            format!("{}: posix_fadvise failed ({rc})", path.display()),
        ))
    }
}

/// Plain sequential read of a whole file in large chunks: the yardstick for streaming reads.
pub fn sequential_read_bandwidth(path: &Path, chunk: usize) -> Result<f64> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut buf = vec![0u8; chunk.max(1 << 20)];
    let start = std::time::Instant::now();
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(path.display(), e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64().max(1e-9))
}
