//! The runtime's own kernels: tract ops of our own ([`EdgeConv`], [`EdgeMatMul`]) that take
//! the place of tract's convolutions and 1x1 matrix products in a decluttered model before it
//! is optimised, when the runtime settings ask for them (`EDGE_KERNELS=gemm`, chosen by the
//! tuner by measurement like tract's knobs).
//!
//! Why: tract runs the KxK convolutions of Inception V3 through lazy im2col at 60-90% of what
//! its matrix kernels reach on 1x1 products, and splits the 1x1 products that follow a concat
//! into one product per branch. Our convolution feeds a packed, cache-blocked GEMM (the `gemm`
//! crate) with shifted views of the (padded) input: a stride-1 KxK convolution is K*K
//! accumulated products over a "wide" output grid as wide as the padded input, so no patch is
//! ever copied; strided and badly-shaped ones gather an explicit im2col matrix first. Bias and
//! a following ReLU are applied in the same pass that writes the output.
//!
//! The bundle is untouched: the rewrite happens at load, on the model tract parsed, so a
//! bundle stays plain NNEF that any tract reads, and the choice stays per CPU (the tuner keeps
//! tract's own kernels where they are faster, and checks that both agree on the output).
//!
//! Threads: an op splits its work into one part per thread of tract's current executor (the
//! one an inference runs under, which says how many threads it may use); the caller and
//! [`spin`]'s helper threads run the parts (tract's own ops keep the executor's rayon pool).

/// Compiles a kernel function three times, for AVX-512, AVX2 (x86-64-v3) and the baseline, the
/// widest this CPU runs picked when it is called (`multiversion`): the closures in a version
/// (the parts its threads run, the epilogues) get its instructions too, and so do the
/// `#[inline(always)]` helpers they call (packing, [`activate`]). The micro-kernels dispatch
/// on their own; this is for the loops around them. `multiversion` asks for Ice Lake's AVX-512
/// set (VBMI2, GFNI, VAES, ...: Ice Lake and later Xeons, Zen 4) before it takes the AVX-512
/// version, so Skylake-X and Cascade Lake, whose AVX-512 lowers the clock, run the AVX2 one.
macro_rules! widest {
    ($item:item) => {
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+avx+fma+bmi1+bmi2+lzcnt+popcnt+f16c+movbe",
            "x86_64+avx2+avx+fma+bmi1+bmi2+lzcnt+popcnt+f16c+movbe",
        ))]
        $item
    };
}

mod conv;
mod matmul;
mod panel;
mod pool;
pub(crate) mod spin;
mod winograd;

use std::sync::atomic::{AtomicUsize, Ordering};

use tract_core::internal::*;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::cnn::Conv;
use tract_core::ops::einsum::EinSum;
use tract_linalg::multithread::{Executor, current_tract_executor};

pub use conv::EdgeConv;
pub use matmul::EdgeMatMul;
pub use pool::EdgePool;

/// What [`rewrite`] replaced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub convolutions: usize,
    pub matmuls: usize,
    pub pools: usize,
    /// Sums of two products done as one product accumulated onto the other's result.
    pub accumulated: usize,
    /// Of those, accumulated products merged into the product before them: a chain of
    /// products over a concat's inputs run as one product reading every input in place.
    pub chained: usize,
    /// ReLUs folded into the kernel before them (bias additions are folded too).
    pub relus: usize,
}

/// Which of our kernels [`rewrite`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    /// Winograd F(2x2, 3x3) for the 3x3 stride-1 convolutions it suits.
    pub winograd: bool,
    /// Our driver of the micro-kernels ([`panel`]) where this CPU has them; off, every product
    /// goes through `gemm::gemm` (as on CPUs without them: the kernels' tests run both).
    pub micro_kernels: bool,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            winograd: true,
            micro_kernels: true,
        }
    }
}

/// Replaces every convolution and 1x1 matrix product our kernels handle (f32, concrete shapes,
/// constant weights) in a decluttered model, with the bias addition and ReLU that follow
/// them; the others stay tract's.
pub fn rewrite(mut model: TypedModel, options: KernelOptions) -> TractResult<(TypedModel, Rewritten)> {
    let mut done = Rewritten::default();
    let isa = panel::isa().filter(|_| options.micro_kernels);
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let (mut kernel, input) = if let Some(conv) = node.op_as::<Conv>() {
            match EdgeConv::from_tract(&model, node, conv, options.winograd, isa)? {
                Some(op) => (Kernel::Conv(op), node.inputs[0]),
                None => continue,
            }
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            match EdgeMatMul::from_tract(&model, node, einsum, isa)? {
                Some((op, data)) => (Kernel::MatMul(op), data),
                None => continue,
            }
        } else if let Some((op, data)) = EdgePool::from_tract(&model, node)? {
            (Kernel::Pool(op), data)
        } else {
            continue;
        };
        let mut last = id;
        if let Kernel::MatMul(mm) = &mut kernel
            && let Some((add, bias)) = following_bias(&model, last, mm.layout.n_axis)?
        {
            mm.bias = Some(Arc::new(tensor1(&bias)));
            last = add;
        }
        let relu = match &mut kernel {
            Kernel::Conv(op) => Some(&mut op.relu),
            Kernel::MatMul(op) => Some(&mut op.relu),
            Kernel::Pool(_) => None,
        };
        if let Some(relu) = relu
            && let Some(max) = following_relu(&model, last)?
        {
            *relu = true;
            last = max;
            done.relus += 1;
        }
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(&model, input)?;
        let name = model.nodes[id].name.clone();
        let wire = match kernel {
            Kernel::Conv(op) => {
                done.convolutions += 1;
                patch.wire_node(name, op, &[tap])?
            }
            Kernel::MatMul(op) => {
                done.matmuls += 1;
                patch.wire_node(name, op, &[tap])?
            }
            Kernel::Pool(op) => {
                done.pools += 1;
                patch.wire_node(name, op, &[tap])?
            }
        };
        patch.shunt_outside(&model, OutletId::new(last, 0), wire[0])?;
        patch.apply(&mut model)?;
    }
    let model = accumulate(model.into_compact()?, &mut done)?;
    let model = chain(model, &mut done)?;
    Ok((model, done))
}

/// Merges each chain of products in which each accumulates onto the one before and feeds only
/// the next ([`EdgeMatMul::chains_into`]) into one product ([`EdgeMatMul::chained`]): tract's
/// sum of products over a concat's inputs (Inception V3: up to 6 of them, 134 of its 141
/// products) becomes one product over all the inputs, in one parallel section, whose output
/// is written once, after the whole depth. Each chain is merged at its last product, its
/// weights stacked once.
fn chain(mut model: TypedModel, done: &mut Rewritten) -> TractResult<TypedModel> {
    let outputs = model.output_outlets()?.to_vec();
    // The product `id` accumulates onto, when that one chains into it.
    let previous = |model: &TypedModel, id: usize| -> Option<usize> {
        let node = &model.nodes[id];
        let op = node.op_as::<EdgeMatMul>()?;
        let addend = *node.inputs.last()?;
        let producer = &model.nodes[addend.node];
        let first = producer.op_as::<EdgeMatMul>()?;
        (op.accumulate
            && producer.outputs[0].successors.len() == 1
            && !outputs.contains(&addend)
            && first.chains_into(op))
        .then_some(addend.node)
    };
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        if node.op_as::<EdgeMatMul>().is_none() {
            continue;
        }
        // Not the last of its chain: the next product merges it.
        if let [next] = node.outputs[0].successors.as_slice()
            && previous(&model, next.node) == Some(id)
        {
            continue;
        }
        let mut ids = vec![id];
        while let Some(before) = ids.last().and_then(|&last| previous(&model, last)) {
            ids.push(before);
        }
        if ids.len() < 2 {
            continue;
        }
        ids.reverse();
        let ops = ids
            .iter()
            .map(|&i| {
                model.nodes[i]
                    .op_as::<EdgeMatMul>()
                    .context("EdgeMatMul: a chain's product")
            })
            .collect::<TractResult<Vec<&EdgeMatMul>>>()?;
        let op = EdgeMatMul::chained(&ops)?;
        // Every product's data inputs in turn, then the first's addend if it has one.
        let mut inputs: TVec<OutletId> = TVec::new();
        for (&i, product) in ids.iter().zip(&ops) {
            inputs.extend_from_slice(&model.nodes[i].inputs[..product.depths.len()]);
        }
        inputs.extend_from_slice(&model.nodes[ids[0]].inputs[ops[0].depths.len()..]);
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(&model, &inputs)?;
        let wire = patch.wire_node(model.nodes[id].name.clone(), op, &taps)?;
        patch.shunt_outside(&model, OutletId::new(id, 0), wire[0])?;
        patch.apply(&mut model)?;
        done.chained += ids.len() - 1;
    }
    model.into_compact()
}

/// `a + p` where `p` is a plain product of ours that feeds only this sum: `p` accumulated
/// onto `a` (one pass over the output instead of two), then the bias and ReLU after the sum
/// folded in too. Chains (`((p1 + p2) + p3) + p4`, what tract makes of a 1x1 convolution
/// after a concat) become chains of accumulating products.
fn accumulate(mut model: TypedModel, done: &mut Rewritten) -> TractResult<TypedModel> {
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(bin) = node.op_as::<TypedBinOp>() else {
            continue;
        };
        if bin.0.name() != "Add" || node.inputs.len() != 2 {
            continue;
        }
        let shape = &node.outputs[0].fact.shape;
        if node
            .inputs
            .iter()
            .any(|i| model.outlet_fact(*i).map_or(true, |f| &f.shape != shape))
        {
            continue;
        }
        let outputs = model.output_outlets()?;
        let plain = |slot: usize| {
            let outlet = node.inputs[slot];
            let producer = &model.nodes[outlet.node];
            producer
                .op_as::<EdgeMatMul>()
                .filter(|mm| !mm.accumulate && mm.bias.is_none() && !mm.relu)
                .filter(|_| producer.outputs[0].successors.len() == 1)
                .filter(|_| !outputs.contains(&outlet))
                .map(|mm| (mm.clone(), producer.inputs[0], node.inputs[1 - slot]))
        };
        let Some((mut op, data, addend)) = plain(1).or_else(|| plain(0)) else {
            continue;
        };
        op.accumulate = true;
        let mut last = id;
        if let Some((add, bias)) = following_bias(&model, last, op.layout.n_axis)? {
            op.bias = Some(Arc::new(tensor1(&bias)));
            last = add;
        }
        if let Some(max) = following_relu(&model, last)? {
            op.relu = true;
            last = max;
            done.relus += 1;
        }
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(&model, &[data, addend])?;
        let wire = patch.wire_node(node.name.clone(), op, &taps)?;
        patch.shunt_outside(&model, OutletId::new(last, 0), wire[0])?;
        patch.apply(&mut model)?;
        done.accumulated += 1;
    }
    model.into_compact()
}

enum Kernel {
    Conv(EdgeConv),
    MatMul(EdgeMatMul),
    Pool(EdgePool),
}

/// The only successor of `id` when it adds a constant bias varying along `n_axis` only, with
/// the bias as one value per position of that axis.
fn following_bias(model: &TypedModel, id: usize, n_axis: usize) -> TractResult<Option<(usize, Vec<f32>)>> {
    let Some((succ, konst)) = binary_with_const(model, id, "Add")? else {
        return Ok(None);
    };
    let shape = model.outlet_fact(OutletId::new(id, 0))?.shape.to_tvec();
    let n = shape.get(n_axis).and_then(|d| d.to_usize().ok());
    let fits = konst.rank() == shape.len()
        && konst
            .shape()
            .iter()
            .enumerate()
            .all(|(ax, d)| *d == 1 || Some(*d) == n && ax == n_axis);
    match (fits, n) {
        (true, Some(n)) => Ok(Some((succ, bias_values(&konst, n)?))),
        _ => Ok(None),
    }
}

/// The node that is `id`'s only successor when it is `max(x, 0)` of the same shape.
fn following_relu(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let Some((succ, zero)) = binary_with_const(model, id, "Max")? else {
        return Ok(None);
    };
    let is_zero = zero.len() == 1 && zero.try_as_plain_ram()?.as_slice::<f32>()?[0] == 0.0;
    Ok(is_zero.then_some(succ))
}

/// `id`'s only successor when it is the binary op `name` of `id`'s output and an f32
/// constant, giving an output of the same shape (not a model output itself).
fn binary_with_const(model: &TypedModel, id: usize, name: &str) -> TractResult<Option<(usize, Arc<Tensor>)>> {
    let node = &model.nodes[id];
    if model.output_outlets()?.contains(&OutletId::new(id, 0)) {
        return Ok(None);
    }
    let Some(succ) = model.single_succ(id)? else {
        return Ok(None);
    };
    let Some(bin) = succ.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    if bin.0.name() != name || succ.inputs.len() != 2 {
        return Ok(None);
    }
    let other = if succ.inputs[0].node == id {
        succ.inputs[1]
    } else {
        succ.inputs[0]
    };
    if other.node == id {
        return Ok(None);
    }
    let Some(konst) = const_f32(model, other)? else {
        return Ok(None);
    };
    let same_shape = model.outlet_fact(succ.id.into())?.shape == node.outputs[0].fact.shape;
    Ok(same_shape.then_some((succ.id, konst)))
}

/// The constant f32 tensor feeding `outlet`, if it is one.
fn const_f32(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    let fact = model.outlet_fact(outlet)?;
    Ok(fact.konst.clone().filter(|k| k.datum_type() == f32::datum_type()))
}

/// A 1-D f32 tensor of `len` values written by `fill` in place (a `Vec` made into a tensor
/// is copied: for the weights, 100 MB of copies at every load).
fn f32_tensor(len: usize, fill: impl FnOnce(&mut [f32])) -> TractResult<Tensor> {
    let mut t = Tensor::zero::<f32>(&[len])?;
    fill(t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
    Ok(t)
}

/// Bias of `channels` values from a constant of one value or `channels` values.
fn bias_values(bias: &Tensor, channels: usize) -> TractResult<Vec<f32>> {
    let values = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    match values.len() {
        1 => Ok(vec![values[0]; channels]),
        n if n == channels => Ok(values),
        n => bail!("bias of {n} values for {channels} channels"),
    }
}

/// Runs `f(part)` for `parts` parts: shared by this thread and [`spin`]'s helpers, as many as
/// [`threads`] says, else one after the other on this thread.
fn for_each_part(parts: usize, f: impl Fn(usize) + Sync) {
    match threads() {
        threads if threads > 1 && parts > 1 => spin::run(threads, parts, &f),
        _ => (0..parts).for_each(f),
    }
}

/// Threads the parallel section starting now may use: inside an [`Adaptive`] inference, all of
/// its threads while it is the only adaptive inference running in the process and one
/// otherwise, decided again at every section; elsewhere, tract's current executor's.
fn threads() -> usize {
    if let Some(all) = ADAPTIVE_THREADS.get() {
        return if ADAPTIVE_RUNNING.load(Ordering::Acquire) == 1 {
            all
        } else {
            1
        };
    }
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// Adaptive inferences running in the process now.
static ADAPTIVE_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Adaptive inferences (the daemon's and the pool's) running in the process now: work that
/// would take another core (a split JPEG decode) does so only while this is 0.
pub(crate) fn inferences_running() -> usize {
    ADAPTIVE_RUNNING.load(Ordering::Acquire)
}

thread_local! {
    /// Set while this thread runs an adaptive inference: the threads it may take.
    static ADAPTIVE_THREADS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// An inference whose parallel sections take every one of `threads` threads while it runs
/// alone, one while other adaptive inferences run: a request that started next to another
/// takes the freed core when the other ends (the last requests of a backlog), and one that
/// started alone gives it back when another starts. Held on the inference's thread while it
/// runs; the runtime's own kernels ask [`threads`] at each section.
pub(crate) struct Adaptive {
    outer: Option<usize>,
}

impl Adaptive {
    pub(crate) fn enter(threads: usize) -> Self {
        if ADAPTIVE_RUNNING.fetch_add(1, Ordering::AcqRel) > 0 {
            // Another inference ran alone until now, and its helpers may be spinning for its
            // next section: its sections take one thread from now on, so they park at once
            // instead of spinning on the core this inference is about to use.
            spin::rest();
        }
        Adaptive {
            outer: ADAPTIVE_THREADS.replace(Some(threads)),
        }
    }
}

impl Drop for Adaptive {
    fn drop(&mut self) {
        ADAPTIVE_THREADS.set(self.outer);
        ADAPTIVE_RUNNING.fetch_sub(1, Ordering::AcqRel);
        // Helpers it may have borrowed stop spinning.
        spin::rest();
    }
}

/// Splits `0..len` into at most `parts` ranges whose starts are multiples of `align`, as
/// even as that allows: each boundary is the multiple of `align` nearest to its even share
/// (289 rows in two: 144 + 145, where rounding the share up gave 160 + 129; Inception V3 at 2
/// threads measured the same either way, within noise).
fn split(len: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, len.div_ceil(align).max(1));
    let align = align.max(1);
    let boundary = |i: usize| {
        if i >= parts {
            return len;
        }
        let units = (i * len + parts * align / 2) / (parts * align);
        (units * align).min(len)
    };
    (0..parts)
        .map(|i| boundary(i)..boundary(i + 1))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(rows, cols)` over `0..rows x 0..cols` split in one block per thread: along the
/// rows (starts aligned to `row_align`) when `by_rows`, else along the columns.
fn for_each_block(
    (rows, cols): (usize, usize),
    by_rows: bool,
    (row_align, col_align): (usize, usize),
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let parts = if by_rows {
        split(rows, threads(), row_align)
    } else {
        split(cols, threads(), col_align)
    };
    for_each_part(parts.len(), |i| {
        let part = parts[i].clone();
        if by_rows {
            f(part, 0..cols)
        } else {
            f(0..rows, part)
        }
    });
}

/// A raw pointer handed to the parts of one op (each part writes a disjoint region).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Buffers of earlier inferences, kept for the next ones on the same thread: fresh large
/// allocations come from the kernel as untouched pages, and faulting them in cost more than
/// the products they feed (22 MB of Winograd products: about 5 ms). One list per thread: a
/// list shared by the process handed each thread buffers the other had just written, and
/// two single-threaded inferences at once ran 136 ms each against 122 ms with a list per
/// thread (Inception V3, AMD EPYC, 2 cores; 118 ms alone; two processes: 120 ms each).
struct FreeList {
    buffers: Vec<Vec<f32>>,
    bytes: usize,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<FreeList> =
        const { std::cell::RefCell::new(FreeList { buffers: Vec::new(), bytes: 0 }) };
}

/// Most bytes of scratch one thread keeps between inferences (Inception V3 uses 34 MB).
const MAX_KEPT_PER_THREAD: usize = 64 << 20;

/// Bytes kept by all threads' lists, at most [`max_kept`].
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// Most bytes of scratch the process keeps: a thread's worth per core (the daemon's workers
/// default to one per core; threads past that drop their buffers).
fn max_kept() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| MAX_KEPT_PER_THREAD * std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl FreeList {
    /// Takes the smallest buffer of at least `len` values.
    fn take(&mut self, len: usize) -> Option<Vec<f32>> {
        let best = (self.buffers.iter().enumerate())
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)?;
        let buffer = self.buffers.swap_remove(best);
        self.bytes -= buffer.len() * 4;
        KEPT.fetch_sub(buffer.len() * 4, Ordering::Relaxed);
        Some(buffer)
    }

    /// Keeps `buffer` and drops the smallest buffers past the thread's and the process's
    /// bounds.
    fn give(&mut self, buffer: Vec<f32>) {
        let bytes = buffer.len() * 4;
        self.buffers.push(buffer);
        self.bytes += bytes;
        KEPT.fetch_add(bytes, Ordering::Relaxed);
        self.buffers.sort_by_key(|b| std::cmp::Reverse(b.len()));
        while self.bytes > MAX_KEPT_PER_THREAD || KEPT.load(Ordering::Relaxed) > max_kept() {
            let Some(smallest) = self.buffers.pop() else { break };
            self.bytes -= smallest.len() * 4;
            KEPT.fetch_sub(smallest.len() * 4, Ordering::Relaxed);
        }
    }
}

impl Drop for FreeList {
    fn drop(&mut self) {
        KEPT.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A scratch buffer of `len` values from this thread's free list, with stale contents (every
/// caller writes what it reads, or zeroes it first); given back when dropped.
struct Scratch(Vec<f32>);

impl Scratch {
    fn take(len: usize) -> Scratch {
        // No list (the thread is exiting) or none fitting: a new buffer.
        let reused = SCRATCH
            .try_with(|free| free.borrow_mut().take(len))
            .ok()
            .flatten();
        Scratch(reused.unwrap_or_else(|| vec![0f32; len]))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        // A thread that is exiting just frees it.
        let _ = SCRATCH.try_with(|free| free.borrow_mut().give(buffer));
    }
}

/// A value of a kernel's output: plus its channel's bias, then the ReLU when folded in.
#[inline(always)]
fn activate(v: f32, bias: f32, relu: bool) -> f32 {
    let v = v + bias;
    if relu { v.max(0.0) } else { v }
}

/// Evaluates an op image by image: `run(x, y)` for each of the `batch` images of the input
/// (`image_in` values each) into a new output of `output_shape` (`image_out` values each),
/// which `run` must write whole.
fn eval_images(
    what: &str,
    inputs: TVec<TValue>,
    output_shape: &[usize],
    (batch, image_in, image_out): (usize, usize, usize),
    run: impl Fn(&[f32], &mut [f32]) -> TractResult<()>,
) -> TractResult<TVec<TValue>> {
    let input = args_1!(inputs);
    let x = input.try_as_plain_ram()?;
    let x = x.as_slice::<f32>()?;
    ensure!(x.len() == batch * image_in, "{what} input of {} values", x.len());
    ensure!(output_shape.iter().product::<usize>() == batch * image_out);
    // SAFETY: `run` writes every value of each image's output.
    let mut output = unsafe { Tensor::uninitialized::<f32>(output_shape)? };
    {
        let mut view = output.try_as_plain_ram_mut()?;
        let y = view.as_slice_mut::<f32>()?;
        for b in 0..batch {
            run(
                &x[b * image_in..][..image_in],
                &mut y[b * image_out..][..image_out],
            )?;
        }
    }
    Ok(tvec!(output.into_tvalue()))
}

/// Strides as `gemm` takes them.
fn signed((a, b): (usize, usize)) -> (isize, isize) {
    (a as isize, b as isize)
}

/// `dst (m x n) = lhs (m x k) * rhs (k x n)` (+ `dst` when `accumulate`), strides in elements
/// (`rs` between rows, `cs` between columns), on this thread.
///
/// # Safety
/// Every element addressed by the dimensions and strides must be inside its allocation, and
/// `dst` must not overlap `lhs` or `rhs` or be written by another thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (isize, isize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (isize, isize),
) {
    if m == 0 || n == 0 {
        return;
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tune::pseudo_random;
    use tract_core::ops::cnn::{KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::math::max;
    use tract_core::ops::nn::DataFormat;

    #[test]
    fn adaptive_sections_take_every_thread_only_while_no_other_adaptive_inference_runs() {
        assert_eq!(
            threads(),
            1,
            "outside an inference: tract's executor (single here)"
        );
        let me = Adaptive::enter(2);
        assert_eq!(threads(), 2, "alone");
        let (started, ended) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                let other = Adaptive::enter(2);
                assert_eq!(threads(), 1, "the other one, started second");
                started.wait();
                ended.wait();
                drop(other);
            });
            started.wait();
            assert_eq!(threads(), 1, "while another runs");
            ended.wait();
        });
        assert_eq!(threads(), 2, "the other ended: alone again");
        drop(me);
        assert_eq!(threads(), 1);
    }

    /// Runs `model` as tract has it and rewritten, on 1 and 2 threads, and returns the largest
    /// difference (relative to the largest output value, when above 1) and what the rewrite did, with our ops' descriptions.
    fn compare(model: TypedModel, options: KernelOptions) -> (f32, Rewritten, String) {
        // Through `gemm::gemm` as on CPUs without our micro-kernels, then as this CPU runs it.
        let off = KernelOptions {
            micro_kernels: false,
            ..options
        };
        let (worst_off, done_off, _) = compare_with(model.clone(), off);
        let (worst, done, info) = compare_with(model, options);
        assert_eq!(done, done_off);
        (worst.max(worst_off), done, info)
    }

    fn compare_with(model: TypedModel, options: KernelOptions) -> (f32, Rewritten, String) {
        let input = pseudo_random(model.input_fact(0).unwrap().shape.as_concrete().unwrap());
        let (ours, done) = rewrite(model.clone(), options).unwrap();
        let info: Vec<String> = ours
            .nodes
            .iter()
            .filter(|n| n.op.name().starts_with("Edge"))
            .flat_map(|n| n.op.info().unwrap())
            .collect();
        let theirs = model.into_runnable().unwrap();
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        let expected = theirs.run(tvec![input.clone().into_tvalue()]).unwrap().remove(0);
        let mut worst = 0f32;
        for executor in [Executor::SingleThread, Executor::multithread(2)] {
            let got = tract_linalg::multithread::multithread_tract_scope(executor, || {
                ours.run(tvec![input.clone().into_tvalue()])
            })
            .unwrap()
            .remove(0);
            assert_eq!(got.shape(), expected.shape());
            let (e, g) = (
                expected.try_as_plain_ram().unwrap(),
                got.try_as_plain_ram().unwrap(),
            );
            let (e, g) = (e.as_slice::<f32>().unwrap(), g.as_slice::<f32>().unwrap());
            // Relative to the output's largest value (sums over hundreds of products round
            // differently in the last bits, in any order).
            let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (a, b) in e.iter().zip(g) {
                worst = worst.max((a - b).abs() / scale);
            }
        }
        (worst, done, info.join("; "))
    }

    /// A model of one tract convolution (OIHW weights, a bias), optionally followed by a ReLU.
    fn conv_model(
        format: DataFormat,
        (h, w, c, o): (usize, usize, usize, usize),
        kernel: [usize; 2],
        strides: [usize; 2],
        padding: PaddingSpec,
        relu: bool,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let shape: Vec<usize> = format
            .from_n_c_hw(1, c, [h, w].as_slice())
            .unwrap()
            .shape
            .to_vec();
        let x = model.add_source("x", f32::fact(&shape)).unwrap();
        let k = model
            .add_const("k", pseudo_random(&[o, c, kernel[0], kernel[1]]))
            .unwrap();
        let b = model.add_const("b", pseudo_random(&[o])).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec::new(
                format,
                kernel.iter().copied().collect(),
                padding,
                None,
                Some(strides.iter().copied().collect()),
                c,
                o,
            ),
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[x, k, b]).unwrap();
        if relu {
            let zero = model
                .add_const("zero", tensor0(0f32).broadcast_into_rank(shape.len()).unwrap())
                .unwrap();
            y = model.wire_node("relu", max(), &[y[0], zero]).unwrap();
        }
        model.select_output_outlets(&y).unwrap();
        model
    }

    #[test]
    fn convolutions_match_tract() {
        let explicit = |t, l, b, r| PaddingSpec::Explicit(tvec![t, l], tvec![b, r]);
        for (format, dims, kernel, strides, padding, relu) in [
            // Wide grid, as wide as the output (no padding): in place.
            (
                DataFormat::NHWC,
                (9, 7, 5, 6),
                [3, 3],
                [1, 1],
                PaddingSpec::Valid,
                true,
            ),
            (
                DataFormat::CHW,
                (9, 7, 5, 6),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
            ),
            (
                DataFormat::NCHW,
                (11, 12, 4, 3),
                [5, 5],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
            ),
            (
                DataFormat::HWC,
                (17, 17, 8, 7),
                [7, 1],
                [1, 1],
                explicit(3, 0, 3, 0),
                true,
            ),
            // Deeper than one pass of the micro-kernels (512): 5x5 over 24 and 40 channels.
            (
                DataFormat::NCHW,
                (9, 26, 24, 50),
                [5, 5],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
            ),
            (
                DataFormat::NHWC,
                (8, 30, 40, 70),
                [5, 5],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
            ),
            // im2col: strides, and a wide grid wasting too many columns.
            (
                DataFormat::NHWC,
                (17, 17, 8, 7),
                [1, 7],
                [1, 1],
                explicit(0, 3, 0, 3),
                true,
            ),
            (
                DataFormat::CHW,
                (8, 8, 6, 9),
                [1, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
            ),
            (
                DataFormat::NHWC,
                (15, 13, 3, 8),
                [3, 3],
                [2, 2],
                PaddingSpec::Valid,
                true,
            ),
            (
                DataFormat::NCHW,
                (15, 13, 5, 4),
                [3, 3],
                [2, 1],
                explicit(1, 0, 1, 2),
                false,
            ),
            (
                DataFormat::CHW,
                (16, 13, 3, 70),
                [3, 3],
                [2, 2],
                PaddingSpec::SameUpper,
                true,
            ),
            // More output channels than pixels: split by columns on 2 threads.
            (
                DataFormat::CHW,
                (4, 4, 3, 40),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
            ),
            // Winograd (3x3, stride 1, at least 64 channels and 100 tiles): odd sizes (edge
            // tiles) and even, channels last and first.
            (
                DataFormat::NHWC,
                (21, 19, 64, 5),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
            ),
            (
                DataFormat::CHW,
                (20, 22, 64, 7),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
            ),
            (
                DataFormat::NCHW,
                (23, 24, 65, 3),
                [3, 3],
                [1, 1],
                PaddingSpec::Valid,
                true,
            ),
            // Channels first, more output channels (50) and tiles (225) than above.
            (
                DataFormat::NCHW,
                (30, 29, 64, 50),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
            ),
            // 32 input channels: Winograd on our micro-kernels only (channels first).
            (
                DataFormat::NCHW,
                (25, 27, 32, 9),
                [3, 3],
                [1, 1],
                PaddingSpec::Valid,
                true,
            ),
            (
                DataFormat::NHWC,
                (25, 27, 32, 9),
                [3, 3],
                [1, 1],
                PaddingSpec::Valid,
                true,
            ),
        ] {
            let model = conv_model(format, dims, kernel, strides, padding.clone(), relu);
            let (worst, done, info) = compare(model, KernelOptions::default());
            let case = format!("{format:?} {dims:?} {kernel:?} {strides:?} {padding:?}: {info}");
            let panels = panel::isa().is_some() && !format.c_is_last();
            let winograd = kernel == [3, 3] && strides == [1, 1] && dims.2 >= if panels { 32 } else { 64 };
            assert_eq!(info.contains("Winograd"), winograd, "{case}");
            assert_eq!(done.convolutions, 1, "{case}");
            assert_eq!(done.relus, usize::from(relu), "{case}");
            assert!(worst < 1e-4, "{case}: differs by {worst}");
        }
        // Winograd off: the same convolution by shifted products.
        let model = conv_model(
            DataFormat::CHW,
            (21, 23, 64, 5),
            [3, 3],
            [1, 1],
            PaddingSpec::SameUpper,
            true,
        );
        let (worst, _, info) = compare(
            model,
            KernelOptions {
                winograd: false,
                ..KernelOptions::default()
            },
        );
        assert!(
            info.contains("shifted products") && worst < 1e-4,
            "{info}: {worst}"
        );
    }

    /// A product of an activation with constant weights (`[n, k]` or `[k, n]`, as `expr`
    /// says), plus a bias along `n` and a ReLU.
    fn matmul_model(expr: &str, data: &[usize], n: usize, bias_shape: &[usize]) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(data)).unwrap();
        let k = data[expr.find('k').unwrap()];
        let w_axes = expr.split(',').nth(1).unwrap().split("->").next().unwrap();
        let w_shape: Vec<usize> = w_axes.chars().map(|a| if a == 'k' { k } else { n }).collect();
        let w = model.add_const("w", pseudo_random(&w_shape)).unwrap();
        let einsum = EinSum::new(expr.parse().unwrap(), f32::datum_type());
        let y = model.wire_node("mm", einsum, &[x, w]).unwrap();
        let b = model.add_const("b", pseudo_random(bias_shape)).unwrap();
        let y = model
            .wire_node("bias", tract_core::ops::math::add(), &[y[0], b])
            .unwrap();
        let rank = model.outlet_fact(y[0]).unwrap().rank();
        let zero = model
            .add_const("zero", tensor0(0f32).broadcast_into_rank(rank).unwrap())
            .unwrap();
        let y = model.wire_node("relu", max(), &[y[0], zero]).unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    #[test]
    fn products_with_bias_and_relu_match_tract() {
        for (expr, data, n, bias) in [
            ("mk,nk->mn", vec![50, 24], 10, vec![1, 10]),
            ("kam,nk->nam", vec![24, 5, 7], 33, vec![33, 1, 1]),
            // Weights `[k, n]` with a column-major output: stored `[n, k]` at load.
            ("kam,kn->nam", vec![24, 5, 7], 33, vec![33, 1, 1]),
            ("mk,kn->mn", vec![50, 24], 10, vec![1, 10]),
            ("ckam,nk->bnam", vec![1, 16, 6, 6], 8, vec![1, 8, 1, 1]),
            // Fewer rows than columns: split by columns on 2 threads.
            ("bk,nk->bn", vec![1, 64], 40, vec![1, 40]),
            // Deeper than one pass of the micro-kernels (512); few columns (the data read in
            // place) and more; rows past a whole tile.
            ("kam,nk->nam", vec![600, 9, 9], 40, vec![40, 1, 1]),
            ("kam,nk->nam", vec![100, 9, 9], 70, vec![70, 1, 1]),
            ("mk,nk->mn", vec![70, 600], 70, vec![1, 70]),
        ] {
            let model = matmul_model(expr, &data, n, &bias);
            let (worst, done, _) = compare(model, KernelOptions::default());
            assert_eq!((done.matmuls, done.relus), (1, 1), "{expr}");
            assert!(worst < 1e-4, "{expr}: differs by {worst}");
        }
    }

    #[test]
    fn sums_of_products_accumulate_with_the_bias_and_relu_after_them() {
        // Small inputs; then deeper than a pass of the micro-kernels (512: passes end inside
        // an input and between two), over rows past two whole tiles.
        sums_of_products([5, 7, 3], (6, 4));
        sums_of_products([300, 260, 100], (10, 13));
    }

    fn sums_of_products(depths: [usize; 3], (a, m): (usize, usize)) {
        // ((x1 W1 + x2 W2) + x3 W3) + b, then ReLU: tract's form of a 1x1 convolution after
        // a concat of three branches.
        let mut model = TypedModel::default();
        let mut sum = None;
        for (i, k) in depths.into_iter().enumerate() {
            let x = model.add_source(format!("x{i}"), f32::fact([k, a, m])).unwrap();
            let w = model.add_const(format!("w{i}"), pseudo_random(&[9, k])).unwrap();
            let einsum = EinSum::new("kam,nk->nam".parse().unwrap(), f32::datum_type());
            let p = model.wire_node(format!("p{i}"), einsum, &[x, w]).unwrap()[0];
            sum = Some(match sum {
                None => p,
                Some(s) => model
                    .wire_node(format!("s{i}"), tract_core::ops::math::add(), &[s, p])
                    .unwrap()[0],
            });
        }
        let b = model.add_const("b", pseudo_random(&[9, 1, 1])).unwrap();
        let y = model
            .wire_node("bias", tract_core::ops::math::add(), &[sum.unwrap(), b])
            .unwrap();
        let zero = model
            .add_const("zero", tensor0(0f32).broadcast_into_rank(3).unwrap())
            .unwrap();
        let y = model.wire_node("relu", max(), &[y[0], zero]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let inputs: TVec<TValue> = (0..3)
            .map(|i| pseudo_random(model.input_fact(i).unwrap().shape.as_concrete().unwrap()).into_tvalue())
            .collect();
        let (ours, done) = rewrite(model.clone(), KernelOptions::default()).unwrap();
        assert_eq!(
            (done.matmuls, done.accumulated, done.relus),
            (3, 2, 1),
            "{done:?}"
        );
        assert!(!ours.nodes.iter().any(|n| n.op_is::<TypedBinOp>()), "{ours}");
        // On our micro-kernels the chain is one product over the three inputs.
        let products = ours.nodes.iter().filter(|n| n.op_is::<EdgeMatMul>()).count();
        let chained = if panel::isa().is_some() { 2 } else { 0 };
        assert_eq!((done.chained, products), (chained, 3 - chained), "{ours}");
        let expected = model
            .into_runnable()
            .unwrap()
            .run(inputs.clone())
            .unwrap()
            .remove(0);
        let ours = ours.into_optimized().unwrap().into_runnable().unwrap();
        for executor in [Executor::SingleThread, Executor::multithread(2)] {
            let got =
                tract_linalg::multithread::multithread_tract_scope(executor, || ours.run(inputs.clone()))
                    .unwrap()
                    .remove(0);
            let (e, g) = (
                expected.try_as_plain_ram().unwrap(),
                got.try_as_plain_ram().unwrap(),
            );
            let (e, g) = (e.as_slice::<f32>().unwrap(), g.as_slice::<f32>().unwrap());
            let worst = e.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "differs by {worst}");
        }
    }

    #[test]
    fn pools_match_tract() {
        use tract_core::ops::cnn::{MaxPool, SumPool};
        let explicit = |t, l, b, r| PaddingSpec::Explicit(tvec![t, l], tvec![b, r]);
        for (format, (h, w, c), kernel, strides, padding, max, moved) in [
            (
                DataFormat::NCHW,
                (15, 15, 6),
                [3, 3],
                [2, 2],
                PaddingSpec::Valid,
                true,
                false,
            ),
            (
                DataFormat::NCHW,
                (15, 14, 6),
                [3, 3],
                [2, 2],
                PaddingSpec::Valid,
                true,
                true,
            ),
            (
                DataFormat::NHWC,
                (9, 8, 5),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
                false,
            ),
            (
                DataFormat::CHW,
                (9, 8, 5),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
                true,
            ),
            // A stride-2 3x3 sum in one pass per row.
            (
                DataFormat::CHW,
                (9, 11, 3),
                [3, 3],
                [2, 2],
                PaddingSpec::Valid,
                false,
                false,
            ),
            // Same-size pools (stride 1, output as large as the input), reduced plane by
            // plane: a max, and a sum whose kernel is taller than wide.
            (
                DataFormat::NCHW,
                (8, 8, 7),
                [3, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                true,
                false,
            ),
            (
                DataFormat::CHW,
                (6, 11, 4),
                [5, 3],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
                false,
            ),
            // A kernel larger than the map: taps off the plane for every pixel.
            (
                DataFormat::CHW,
                (2, 3, 2),
                [7, 7],
                [1, 1],
                PaddingSpec::SameUpper,
                false,
                false,
            ),
            (
                DataFormat::CHW,
                (7, 9, 3),
                [2, 3],
                [1, 2],
                explicit(1, 1, 0, 1),
                false,
                false,
            ),
            (
                DataFormat::HWC,
                (7, 9, 3),
                [3, 2],
                [2, 1],
                explicit(0, 1, 1, 0),
                true,
                false,
            ),
        ] {
            let mut model = TypedModel::default();
            let (c_axis, last) = if format.has_n() { (1, 3) } else { (0, 2) };
            let shape: Vec<usize> = format
                .from_n_c_hw(1, c, [h, w].as_slice())
                .unwrap()
                .shape
                .to_vec();
            let source_shape = if moved {
                // Channels last, moved to first for the pool.
                let mut s = shape.clone();
                let channels = s.remove(c_axis);
                s.push(channels);
                s
            } else {
                shape.clone()
            };
            let mut x = model.add_source("x", f32::fact(&source_shape)).unwrap();
            if moved {
                x = model.wire_node("move", AxisOp::Move(last, c_axis), &[x]).unwrap()[0];
            }
            let spec = PoolSpec::new(
                format,
                kernel.iter().copied().collect(),
                padding.clone(),
                None,
                Some(strides.iter().copied().collect()),
                c,
                c,
            );
            let y = if max {
                model.wire_node(
                    "pool",
                    MaxPool {
                        pool_spec: spec,
                        with_index_outputs: None,
                    },
                    &[x],
                )
            } else {
                let pool = SumPool {
                    pool_spec: spec,
                    count_include_pad: false,
                    normalize: true,
                };
                model.wire_node("pool", pool, &[x])
            }
            .unwrap();
            model.select_output_outlets(&y).unwrap();
            let case = format!("{format:?} {h}x{w}x{c} {kernel:?} {strides:?} {padding:?} moved {moved}");
            let (worst, done, info) = compare(model, KernelOptions::default());
            assert_eq!(done.pools, 1, "{case}");
            assert_eq!(
                info.contains("channels last to channels first"),
                moved,
                "{case}: {info}"
            );
            assert!(worst < 1e-5, "{case}: differs by {worst}");
        }
    }

    #[test]
    fn what_the_kernels_do_not_handle_stays_tract() {
        // A dilated convolution and a product with two activations.
        let mut model = conv_model(
            DataFormat::NHWC,
            (9, 9, 2, 2),
            [3, 3],
            [1, 1],
            PaddingSpec::Valid,
            false,
        );
        let conv = model.node_id_by_name("conv").unwrap();
        if let Some(conv) = model.nodes[conv].op_as_mut::<Conv>() {
            conv.pool_spec.dilations = Some(tvec![2, 2]);
        }
        let (_, done) = rewrite(model, KernelOptions::default()).unwrap();
        assert_eq!(done, Rewritten::default());
        let mut model = TypedModel::default();
        let a = model.add_source("a", f32::fact([4, 3])).unwrap();
        let b = model.add_source("b", f32::fact([5, 3])).unwrap();
        let y = model
            .wire_node(
                "mm",
                EinSum::new("mk,nk->mn".parse().unwrap(), f32::datum_type()),
                &[a, b],
            )
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        assert_eq!(
            rewrite(model, KernelOptions::default()).unwrap().1,
            Rewritten::default()
        );
    }

    #[test]
    fn split_covers_everything_once_on_aligned_starts() {
        for (len, parts, align) in [
            (1225, 2, 16),
            (64, 2, 16),
            (5, 4, 16),
            (0, 2, 8),
            (100, 3, 1),
            (289, 2, 16),
            (17, 3, 16),
        ] {
            let ranges = split(len, parts, align);
            assert!(ranges.len() <= parts.max(1));
            // As even as the alignment allows.
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(
                max.zip(min).is_none_or(|(max, min)| max - min <= align),
                "{len}/{parts}/{align}: {sizes:?}"
            );
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next);
                assert_eq!(r.start % align, 0);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}
