//! Helper threads that share an inference's parallel sections and spin between them.
//!
//! An Inception V3 inference has about 400 parallel sections of 0.05-2 ms each. Handed to a
//! rayon pool, every section wakes a sleeping thread and puts the caller to sleep until the
//! last part is done: a few tens of microseconds each way on a virtual machine, for every
//! section. Here the caller runs parts itself while helpers take the others, and a helper
//! that finished waits for the next section by spinning for [`SPIN`] before it parks (ONNX
//! Runtime's intra-op threads spin the same way). Helpers are made once per process, at most
//! one per core but the first, and only used by inferences running with more than one thread.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper waits, spinning, for the next section before it parks (unless told to
/// [`rest`] first).
const SPIN: Duration = Duration::from_millis(2);

/// Set when no inference needs the helpers now: they park at once instead of spinning.
static REST: AtomicBool = AtomicBool::new(false);

/// Tells spinning helpers to park now: called when a multi-threaded inference ends, so their
/// spinning does not take a core from what the process does next (replying, the next
/// request's decode).
pub(crate) fn rest() {
    REST.store(true, Ordering::Release);
}

/// One parallel section: parts `0..parts`, taken in turn by the caller and the helpers.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    /// A part panicked (on a helper: re-raised on the caller).
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Runs parts until none is left.
    fn work(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::AcqRel);
            if part >= self.parts {
                return;
            }
            let f = self.f;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(part))).is_err() {
                self.panicked.store(true, Ordering::Release);
            }
        }
    }
}

/// A helper thread and the slot sections are handed to it through.
struct Helper {
    /// The section offered to this helper (a `Job` on the caller's stack), or null.
    offered: AtomicPtr<Job<'static>>,
    /// Set by the helper when it is done with the section it took (its last touch of it).
    finished: AtomicBool,
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

impl Helper {
    fn run(&self) {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let job = self.offered.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !job.is_null() {
                // SAFETY: the caller keeps the job alive until it either takes the offer back
                // (then we never saw it) or sees `finished`, which is our last touch of it.
                unsafe { (*job).work() };
                self.finished.store(true, Ordering::Release);
                idle_since = Instant::now();
                spins = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            if !REST.load(Ordering::Acquire) && (!spins.is_multiple_of(64) || idle_since.elapsed() < SPIN) {
                std::hint::spin_loop();
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            if self.offered.load(Ordering::SeqCst).is_null() {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            idle_since = Instant::now();
        }
    }

    fn wake(&self) {
        if self.parked.load(Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }
}

/// The helpers, and which are lent to a section now.
struct Helpers {
    all: Vec<Arc<Helper>>,
    /// Sections in flight take helpers exclusively; a concurrent section runs with fewer.
    busy: Mutex<Vec<bool>>,
}

fn helpers() -> &'static Helpers {
    static HELPERS: OnceLock<Helpers> = OnceLock::new();
    HELPERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let all: Vec<Arc<Helper>> = (1..cores)
            .filter_map(|i| {
                let helper = Arc::new(Helper {
                    offered: AtomicPtr::new(std::ptr::null_mut()),
                    finished: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                    thread: OnceLock::new(),
                });
                let h = helper.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("edge-kernel-{i}"))
                    .spawn(move || h.run())
                    .ok()?;
                let _ = helper.thread.set(handle.thread().clone());
                Some(helper)
            })
            .collect();
        let busy = Mutex::new(vec![false; all.len()]);
        Helpers { all, busy }
    })
}

/// Runs `f(part)` for every part of `0..parts` on this thread and up to `threads - 1` helpers;
/// returns when every part is done. A panic in a part is raised here.
pub(super) fn run(threads: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    REST.store(false, Ordering::Release);
    let lent = lend(threads.saturating_sub(1).min(parts.saturating_sub(1)));
    let job = Job {
        f,
        parts,
        next: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    share(&lent, &job, || ());
}

/// Wakes parked helpers so that they spin, ready for a section about to be offered: waking a
/// parked thread takes ~0.1 ms on a virtual machine (sometimes milliseconds), which the caller
/// can spend on its own work meanwhile. Unused, they park again after [`SPIN`].
pub(crate) fn prewake() {
    REST.store(false, Ordering::Release);
    for helper in &helpers().all {
        helper.wake();
    }
}

/// Runs `f(0)` on this thread and `f(1)` on a helper at the same time, then tells the helpers
/// to rest. `false`, and nothing run, when no helper is free (none made on one core, or all
/// lent to sections in flight). A panic in a part is raised here.
pub(crate) fn run_pair(f: &(dyn Fn(usize) + Sync)) -> bool {
    let lent = lend(1);
    if lent.is_empty() {
        return false;
    }
    REST.store(false, Ordering::Release);
    // The helper starts at part 1; this thread runs part 0, then part 1 too if the helper has
    // not taken it by then.
    let job = Job {
        f,
        parts: 2,
        next: AtomicUsize::new(1),
        panicked: AtomicBool::new(false),
    };
    share(&lent, &job, || f(0));
    rest();
    true
}

/// Marks up to `count` free helpers busy and returns them.
fn lend(count: usize) -> Vec<usize> {
    match helpers().busy.lock() {
        Ok(mut busy) => busy
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| !**b)
            .take(count)
            .map(|(i, b)| {
                *b = true;
                i
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Offers `job` to the `lent` helpers, runs `first` and then the job's parts on this thread,
/// waits for the helpers and frees them.
fn share(lent: &[usize], job: &Job<'_>, first: impl FnOnce()) {
    let pool = helpers();
    // SAFETY (lifetime): helpers only dereference the job between taking the offer and
    // setting `finished`; below, the offer is taken back or `finished` awaited before return.
    let ptr = (job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
    for &i in lent {
        let helper = &pool.all[i];
        helper.finished.store(false, Ordering::Release);
        helper.offered.store(ptr, Ordering::SeqCst);
        helper.wake();
    }
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(first)).is_err() {
        job.panicked.store(true, Ordering::Release);
    }
    job.work();
    for &i in lent {
        let helper = &pool.all[i];
        let taken_back = !helper
            .offered
            .swap(std::ptr::null_mut(), Ordering::AcqRel)
            .is_null();
        if !taken_back {
            while !helper.finished.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
        }
    }
    if let Ok(mut busy) = pool.busy.lock() {
        for &i in lent {
            busy[i] = false;
        }
    }
    if job.panicked.load(Ordering::Acquire) {
        panic!("a part of a runtime kernel panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_whatever_the_threads() {
        for threads in [1, 2, 4] {
            for parts in [0, 1, 2, 3, 17] {
                let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                run(threads, parts, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn sections_from_several_threads_at_once_all_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        run(2, 8, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 8);
    }

    #[test]
    fn a_panicking_part_is_raised_on_the_caller() {
        let result = std::panic::catch_unwind(|| run(2, 4, &|i| assert_ne!(i, 3)));
        assert!(result.is_err());
        // The helpers survive it.
        let n = AtomicUsize::new(0);
        run(2, 4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
