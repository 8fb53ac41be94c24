//! Keeping freed memory in the process while a bundle loads.
//!
//! Loading allocates and frees about the weights' size twice over: tract's tensors read from
//! the bundle, then the runtime kernels' reordered copies, while the originals go. glibc's
//! malloc gives large blocks back to the kernel as soon as they are freed (each its own
//! mapping above its threshold, and the heap's top trimmed past 128 KB), so every page is
//! faulted in and zeroed again for the next allocation: page faults were ~28% of a restart's
//! time (Inception V3 bundle, `perf`). While a [`RetainHeap`] lives, blocks up to 32 MiB come
//! from the heap and nothing is trimmed; when it ends, the free memory goes back to the kernel
//! at once, so the resident set after loading is what it was, and from then on only free memory
//! past [`TRIM_THRESHOLD`] at the top of a heap is given back (what inferences allocate and
//! free again stays mapped).

/// Blocks up to this size come from malloc's heap rather than mappings of their own (glibc's
/// own upper bound for its dynamic threshold on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of a heap kept after loading, instead of glibc's default 128 KB:
/// an inference allocates and frees its activations and scratch (Inception V3: megabytes per
/// layer), and with the default each inference faulted about 4.4 MB back in (1,100 page
/// faults, every page zeroed by the kernel).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// See the module's doc. A no-op off glibc.
pub(crate) struct RetainHeap(());

impl RetainHeap {
    pub(crate) fn new() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes malloc's thresholds; any value is valid for these two.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
        RetainHeap(())
    }
}

impl Drop for RetainHeap {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above; malloc_trim only returns free memory to the kernel.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::malloc_trim(0);
        }
    }
}
