//! The machine's peak single-precision FLOP/s, measured: independent fused multiply-add
//! chains in AVX2 registers (x86_64 with FMA), on one core and on every core at once.

use std::time::Instant;

use crate::report::{Report, Target};

pub struct Peak {
    /// FLOP/s (a multiply-add counts 2) on one core, and on all cores together.
    pub one: f64,
    pub all: f64,
}

pub fn measure(cpus: usize, report: &mut Report) -> Peak {
    let one = flops_per_second();
    let all: f64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cpus).map(|_| s.spawn(flops_per_second)).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    if one > 0.0 {
        report.row(
            "machine",
            "peak FP32, 1 core",
            one / 1e9,
            "GFLOP/s",
            None,
            Target::None,
        );
        report.row(
            "machine",
            format!("peak FP32, {cpus} cores"),
            all / 1e9,
            "GFLOP/s",
            None,
            Target::None,
        );
        report.note(
            "machine",
            "Peak: 12 independent chains of 8-wide AVX2 FMAs per core (`_mm256_fmadd_ps`), about 0.3 s \
             per measurement; every core at once for the multi-core figure.",
        );
    } else {
        report.note(
            "machine",
            "No AVX2+FMA on this CPU: the peak FLOP/s was not measured.",
        );
    }
    Peak { one, all }
}

const CHAINS: usize = 12;
const ITERS: u64 = 4_000_000;

fn flops_per_second() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // Best of three: the first may run before the core clocks up.
        return (0..3)
            .map(|_| {
                let start = Instant::now();
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                let sink = unsafe { fma_chains(ITERS) };
                std::hint::black_box(sink);
                ((ITERS / 1024 * 1024) as f64 * CHAINS as f64 * 8.0 * 2.0) / start.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max);
    }
    0.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm256_set1_ps(0.999_999));
    let b = std::hint::black_box(_mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iters / 1024 {
        for _ in 0..1024 {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        // Keeps the compiler from collapsing the chains (the work must happen).
        std::hint::black_box(&mut acc);
    }
    let mut out = [0f32; 8];
    let mut sum = _mm256_setzero_ps();
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    // SAFETY: `out` holds 8 floats, the store is unaligned.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}
