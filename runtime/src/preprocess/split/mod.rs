//! Decoding one large JPEG on two cores. libjpeg-turbo decodes a scan on one thread, and
//! most of its time on a camera frame is the Huffman decoding, which no SIMD shortens: a
//! 1080p frame takes ~6 ms on one core. Here the caller's thread decodes the image's top rows
//! straight from the JPEG (libjpeg-turbo's cropped decode stops there) while a helper thread
//! (the runtime kernels', idle while no inference runs) finds where the rest of the scan
//! starts ([`resume::walk`], which only reads code lengths) and decodes it as a JPEG of its
//! own ([`resume::resumed_jpeg`]). [`Plan`] says which rows each part decodes: for a whole
//! image the parts write their rows of one pixel buffer; for an input tensor the helper's
//! part starts a few rows higher and each thread goes on to resize its band of the input from
//! its own rows (`Preprocessor::tensor_on_two_cores`). The pixels are libjpeg-turbo's own for
//! the whole image: each part is decoded by it, and where chroma is smoothed across rows the
//! cut leaves each part half a row of MCUs of real context (the unit tests compare with the
//! one-thread decode, byte for byte).
//!
//! Only baseline JPEGs with one scan and no restart markers are split (what libjpeg, the
//! `image` crate and most software write by default); anything else, or any failure, returns
//! `None` and the caller decodes on one thread. JPEGs with restart markers (many cameras write
//! them) could be cut at a marker without any walk; that is not built.

mod huffman;
mod layout;
mod resume;
mod skip;

use std::cell::RefCell;
use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use turbojpeg_sys as tj;

use layout::Layout;

use crate::runtime::kernels::{self, spin};

/// Share of the rows of MCUs the caller's thread decodes at first: the helper first walks
/// those rows' Huffman codes (~0.25 of the time decoding them takes), then decodes the rest.
/// Each split then moves it towards the share at which both parts would have ended together
/// ([`next_share`]): the rows of a frame do not cost the same, and the helper's core may be
/// slower or busier than the caller's.
const FIRST_SHARE: f64 = 0.65;
/// The shares the cut may move between.
const SHARES: std::ops::RangeInclusive<f64> = 0.5..=0.85;

/// The share the next split takes (an `f64`'s bits), by scale (1, 1/2, 1/4, 1/8): the
/// decoding's cost against the walk's differs with it.
static SHARE: [AtomicU64; 4] = [const { AtomicU64::new(FIRST_SHARE.to_bits()) }; 4];

/// The learned share for decoding at 1/`denom` scale.
fn share_for(denom: usize) -> &'static AtomicU64 {
    &SHARE[(denom.max(1).trailing_zeros() as usize).min(3)]
}

/// The share after a split at `used` whose caller's part took `caller` (its rows decoded and
/// used) and helper's part `helper`, of which `walk` to reach the cut: a step of the way
/// from `old` to where, with times proportional to rows, both parts end together.
fn next_share(old: f64, used: f64, caller: f64, helper: f64, walk: f64) -> f64 {
    // caller = a x share; helper = w x share + b x (1 - share).
    let a = caller / used;
    let w = walk / used;
    let b = (helper - walk) / (1.0 - used);
    let even = b / (a + b - w);
    if !even.is_finite() || a <= 0.0 || b <= 0.0 || a + b - w <= 0.0 {
        return old;
    }
    let even = even.clamp(*SHARES.start(), *SHARES.end());
    // Half way: one frame's times are noisy.
    old + 0.5 * (even - old)
}

/// Fewest rows of MCUs and bytes of scan worth two threads.
const MIN_ROWS: usize = 8;
const MIN_SCAN_BYTES: usize = 64 * 1024;

/// Decodes `bytes` to RGB at 1/`denom` scale (1, 2, 4 or 8) on this thread and a helper:
/// (pixels, width, height), or `None` when the JPEG does not qualify, an inference is running
/// in the process, no helper is free or a part fails.
pub(super) fn decode(bytes: &[u8], denom: usize) -> Option<(Vec<u8>, usize, usize)> {
    if !helper_idle() {
        return None;
    }
    decode_on(bytes, denom, spin::run_pair)
}

/// [`decode`] with `run_pair`, which runs `f(0)` and `f(1)` at the same time, or nothing and
/// says so.
fn decode_on(
    bytes: &[u8],
    denom: usize,
    run_pair: impl FnOnce(&(dyn Fn(usize) + Sync)) -> bool,
) -> Option<(Vec<u8>, usize, usize)> {
    let plan = Plan::new(bytes, denom, 0)?;
    // Not zeroed: libjpeg-turbo writes every byte, and nothing reads them before.
    let mut pixels = Box::new_uninit_slice(plan.width.checked_mul(plan.height)?.checked_mul(3)?);
    let (top, bottom) = pixels.split_at_mut_checked(plan.top_rows().end.checked_mul(plan.width * 3)?)?;
    if !plan.run(bytes, top, bottom, &|_, _| Some(()), run_pair) {
        return None;
    }
    // SAFETY: both parts were decoded whole into their halves, which are all of `pixels`.
    let pixels = unsafe { pixels.assume_init() };
    Some((pixels.into_vec(), plan.width, plan.height))
}

/// Whether a split decode may take the runtime kernels' helper: not while an inference runs
/// in the process (it needs the other cores).
pub(super) fn helper_idle() -> bool {
    kernels::inferences_running() == 0
}

/// Wakes the kernels' helper for a split of `bytes` about to be tried, where one will be: a
/// JPEG that qualifies (its headers read, ~0.01 ms), while no inference runs.
pub(super) fn prewake(bytes: &[u8]) {
    if bytes.len() >= MIN_SCAN_BYTES
        && helper_idle()
        && let Some(layout) = Layout::parse(bytes)
        && layout.mcus().1 >= MIN_ROWS
        && bytes.len() - layout.scan_start >= MIN_SCAN_BYTES
    {
        spin::prewake();
    }
}

/// The runtime kernels' `run_pair` while no inference runs.
pub(super) fn run_pair(f: &(dyn Fn(usize) + Sync)) -> bool {
    helper_idle() && spin::run_pair(f)
}

/// How a JPEG is cut in two: the rows of the image (at the decoded scale) each part decodes.
pub(super) struct Plan {
    /// Share of the rows of MCUs the first part decodes.
    share: f64,
    layout: Layout,
    denom: usize,
    /// Row of MCUs the second part resumes the scan at.
    resume: usize,
    /// Rows of the decoded image (at the scale) the second part crops away: its made-up row
    /// and the margin.
    skip: usize,
    top_end: usize,
    bottom_start: usize,
    pub width: usize,
    pub height: usize,
}

impl Plan {
    /// The cut of `bytes` at 1/`denom` scale whose two parts share at least `overlap` rows,
    /// or `None` when the JPEG does not qualify.
    pub(super) fn new(bytes: &[u8], denom: usize, overlap: usize) -> Option<Plan> {
        let layout = Layout::parse(bytes)?;
        let (_, rows) = layout.mcus();
        if rows < MIN_ROWS || bytes.len() - layout.scan_start < MIN_SCAN_BYTES {
            return None;
        }
        let share = f64::from_bits(share_for(denom).load(Ordering::Relaxed));
        let row = ((rows as f64 * share).round() as usize).clamp(2, rows - 2);
        let (_, mcu_height) = layout.mcu_size();
        let per_row = (mcu_height / denom).max(1);
        let margin = if layout.subsampled_vertically() {
            per_row.div_ceil(2)
        } else {
            0
        };
        // The second part starts enough rows of MCUs earlier to share `overlap` rows.
        let resume = row.checked_sub(overlap.div_ceil(per_row))?;
        if resume < 1 {
            return None;
        }
        let (width, height) = (layout.width.div_ceil(denom), layout.height.div_ceil(denom));
        let (top_end, bottom_start) = (row * per_row + margin, resume * per_row + margin);
        if top_end >= height {
            return None;
        }
        Some(Plan {
            share: row as f64 / rows as f64,
            layout,
            denom,
            resume,
            skip: per_row + margin,
            top_end,
            bottom_start,
            width,
            height,
        })
    }

    /// Rows the first part decodes (on the caller's thread).
    pub(super) fn top_rows(&self) -> std::ops::Range<usize> {
        0..self.top_end
    }

    /// Rows the second part decodes (on the helper).
    pub(super) fn bottom_rows(&self) -> std::ops::Range<usize> {
        self.bottom_start..self.height
    }

    /// Decodes the first part's rows into `top` on this thread and the second's into `bottom`
    /// on a helper (RGB, rows packed), each thread then running `then(part, its pixels)`.
    /// `false` when a part or `then` fails, or no helper is free (then nothing ran); `true`
    /// when both buffers were written whole.
    pub(super) fn run(
        &self,
        bytes: &[u8],
        top: &mut [MaybeUninit<u8>],
        bottom: &mut [MaybeUninit<u8>],
        then: &(dyn Fn(usize, &[u8]) -> Option<()> + Sync),
        run_pair: impl FnOnce(&(dyn Fn(usize) + Sync)) -> bool,
    ) -> bool {
        let (top, bottom) = (Mutex::new(top), Mutex::new(bottom));
        // Each part's outcome and time; the second's time to reach the cut.
        let (first, second) = (Mutex::new(None), Mutex::new(None));
        let part = |part: usize| {
            let start = Instant::now();
            if part == 0 {
                let mut top = top.lock().unwrap_or_else(PoisonError::into_inner);
                let done = decode_rows(bytes, self.denom, 0, &mut top).and_then(|top| then(0, top));
                let time = start.elapsed().as_secs_f64();
                *first.lock().unwrap_or_else(PoisonError::into_inner) = done.map(|()| time);
            } else {
                let mut bottom = bottom.lock().unwrap_or_else(PoisonError::into_inner);
                let resume = resume::walk(&self.layout, bytes, self.resume);
                let walk = start.elapsed().as_secs_f64();
                let done = resume
                    .and_then(|resume| resume::resumed_jpeg(&self.layout, bytes, self.resume, &resume))
                    // The made-up row and the margin are cropped away.
                    .and_then(|jpeg| {
                        decode_rows(&jpeg, self.denom, self.skip, &mut bottom).and_then(|b| then(1, b))
                    });
                let time = start.elapsed().as_secs_f64();
                *second.lock().unwrap_or_else(PoisonError::into_inner) = done.map(|()| (time, walk));
            }
        };
        if !run_pair(&part) {
            return false;
        }
        let first = first.into_inner().ok().flatten();
        let second = second.into_inner().ok().flatten();
        let (Some(caller), Some((helper, walk))) = (first, second) else {
            return false;
        };
        let learned = share_for(self.denom);
        let old = f64::from_bits(learned.load(Ordering::Relaxed));
        learned.store(
            next_share(old, self.share, caller, helper, walk).to_bits(),
            Ordering::Relaxed,
        );
        true
    }
}

/// Decodes rows `skip..` of `jpeg` at 1/`denom` scale into `out` (RGB, rows packed), as many
/// rows as `out` holds: `out`, every byte written. `None` on any error or warning, or when
/// `out` does not fit.
fn decode_rows<'o>(
    jpeg: &[u8],
    denom: usize,
    skip: usize,
    out: &'o mut [MaybeUninit<u8>],
) -> Option<&'o [u8]> {
    HANDLE.with(|cell| -> Option<()> {
        let mut slot = cell.borrow_mut();
        let handle = match slot.as_ref() {
            Some(h) => h.0,
            None => slot.insert(Handle::new()?).0,
        };
        let int = |v: usize| c_int::try_from(v).ok();
        // SAFETY: `handle` is a live decompressor owned by this thread; `jpeg` and `out` are
        // valid for their lengths, and the decoded size is checked against `out` first.
        unsafe {
            if tj::tj3DecompressHeader(handle, jpeg.as_ptr(), jpeg.len() as _) != 0 {
                return None;
            }
            let width = usize::try_from(tj::tj3Get(handle, tj::TJPARAM_TJPARAM_JPEGWIDTH as c_int)).ok()?;
            let height = usize::try_from(tj::tj3Get(handle, tj::TJPARAM_TJPARAM_JPEGHEIGHT as c_int)).ok()?;
            let (width, height) = (width.div_ceil(denom), height.div_ceil(denom));
            let pitch = width.checked_mul(3)?;
            let rows = out.len() / pitch.max(1);
            if rows == 0 || rows * pitch != out.len() || skip + rows > height {
                return None;
            }
            let scaling = tj::tjscalingfactor {
                num: 1,
                denom: int(denom)?,
            };
            let region = tj::tjregion {
                x: 0,
                y: int(skip)?,
                w: int(width)?,
                h: int(rows)?,
            };
            let ok = tj::tj3SetScalingFactor(handle, scaling) == 0
                && tj::tj3SetCroppingRegion(handle, region) == 0
                && tj::tj3Decompress8(
                    handle,
                    jpeg.as_ptr(),
                    jpeg.len() as _,
                    out.as_mut_ptr().cast::<u8>(),
                    int(pitch)?,
                    tj::TJPF_TJPF_RGB,
                ) == 0;
            ok.then_some(())
        }
    })?;
    // SAFETY: the decode succeeded, writing `rows` rows of `pitch` bytes: all of `out`.
    Some(unsafe { &*(out as *mut [MaybeUninit<u8>] as *const [u8]) })
}

/// A TurboJPEG decompressor that stops at the first warning (the caller then decodes the
/// usual way, which reports it).
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Option<Handle> {
        // SAFETY: plain constructor; a null handle is refused.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return None;
        }
        let handle = Handle(handle);
        // SAFETY: a live handle.
        let set = unsafe { tj::tj3Set(handle.0, tj::TJPARAM_TJPARAM_STOPONWARNING as c_int, 1) };
        (set == 0).then_some(handle)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

#[cfg(test)]
mod tests;
