//! The machine's peak single-precision FLOP/s, measured: independent fused multiply-add
//! chains in AVX2 registers (x86_64 with FMA), and in AVX-512 registers where the CPU has
//! them (the wider wins: twice AVX2 on CPUs with two 512-bit FMA units, the same where
//! AVX-512 is split into 256-bit halves), on one core and on every core at once.

use std::time::Instant;

use crate::report::{Report, Target};

pub struct Peak {
    /// FLOP/s (a multiply-add counts 2) on one core, and on all cores together.
    pub one: f64,
    pub all: f64,
}

pub fn measure(cpus: usize, report: &mut Report) -> Peak {
    let avx2 = flops_per_second(Width::Avx2);
    let avx512 = flops_per_second(Width::Avx512);
    let width = if avx512 > avx2 { Width::Avx512 } else { Width::Avx2 };
    let one = avx2.max(avx512);
    let all: f64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cpus)
            .map(|_| s.spawn(move || flops_per_second(width)))
            .collect();
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
        let avx512 = if avx512 > 0.0 {
            format!("16-wide AVX-512 (`_mm512_fmadd_ps`) {:.0} GFLOP/s", avx512 / 1e9)
        } else {
            "no AVX-512 on this CPU".to_string()
        };
        report.note(
            "machine",
            format!(
                "Peak: 12 independent FMA chains per core, the wider of 8-wide AVX2 (`_mm256_fmadd_ps`) \
                 {:.0} GFLOP/s and {avx512} on one core, best of 3 measurements of about 0.3 s; every \
                 core at once (with the wider) for the multi-core figure.",
                avx2 / 1e9
            ),
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

#[derive(Clone, Copy)]
enum Width {
    Avx2,
    Avx512,
}

/// FLOP/s of FMA chains `width` wide on this core; 0 where the CPU lacks the instructions.
fn flops_per_second(width: Width) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: bool| f && std::arch::is_x86_feature_detected!("fma");
        let (lanes, run): (f64, unsafe fn(u64) -> f32) = match width {
            Width::Avx2 if has(std::arch::is_x86_feature_detected!("avx2")) => (8.0, fma_chains),
            Width::Avx512 if has(std::arch::is_x86_feature_detected!("avx512f")) => (16.0, fma_chains_512),
            _ => return 0.0,
        };
        // Best of three: the first may run before the core clocks up.
        (0..3)
            .map(|_| {
                let start = Instant::now();
                // SAFETY: the CPU has the instructions `run` is compiled for (checked just above).
                let sink = unsafe { run(ITERS) };
                std::hint::black_box(sink);
                ((ITERS / 1024 * 1024) as f64 * CHAINS as f64 * lanes * 2.0) / start.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = width;
        0.0
    }
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_chains_512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm512_set1_ps(0.999_999));
    let b = std::hint::black_box(_mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iters / 1024 {
        for _ in 0..1024 {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        // Keeps the compiler from collapsing the chains (the work must happen).
        std::hint::black_box(&mut acc);
    }
    let mut sum = _mm512_setzero_ps();
    for x in acc {
        sum = _mm512_add_ps(sum, x);
    }
    _mm512_reduce_add_ps(sum)
}
