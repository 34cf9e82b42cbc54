"""Compile every Triton kernel of backend "triton" ahead of time for A100 (sm_80) and H100/H200 (sm_90), with
Triton's own compiler and the ptxas it ships; no GPU needed. Records registers, spills and shared memory of
every config the autotuner may pick, for the head dims the dispatcher sends.

    python tests/compile_gate.py [--full] [--all] [--json PATH]

prints the table (`--full`: every head dim and feature, not only CI's matrix; `--all`: also the configs pruned
for a head dim, to show why). The kernels are compiled exactly as a launch would compile them: the launchers run
on CPU tensors of a representative problem with the kernels swapped for recorders (and the GPU's compute
capability stated, for the autotuner's per-arch pruning), and each recorded call is specialised as Triton's JIT
would (alignment, integers equal to 1) before `triton.compile` with a `GPUTarget`. `tests/test_compile_gate.py`
runs this in CI.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, with the real config lists
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated to keep its notice quiet
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from prefix_kernels.ops import triton_backward, triton_common, triton_decode, triton_prefix_attention  # noqa: E402
from prefix_kernels.ops.triton_decode import SMLimits, resident_programs  # noqa: E402
from prefix_kernels.ops.validate import check_inputs  # noqa: E402

ARCHS = {80: SMLimits(shared=164 * 1024), 90: SMLimits(shared=228 * 1024)}
MAX_SHARED_PER_PROGRAM = {80: 163 * 1024, 90: 227 * 1024}  # what one program may opt in to
# Every BLOCK_D the dispatcher's head dims (multiples of 8 in [16, 256]) map to, and 80 (a head dim below its
# BLOCK_D, so the kernels mask the columns past it) in bf16; the spill-prone head dims in fp16 as well.
HEAD_DIMS = {torch.bfloat16: (16, 32, 64, 80, 128, 256), torch.float16: (64, 128)}
KERNELS = {  # module attribute -> module
    "_forward_kernel": triton_prefix_attention, "_preprocess_kernel": triton_backward,
    "_dkdv_kernel": triton_backward, "_dq_kernel": triton_backward,
    "_split_kernel": triton_decode, "_combine_kernel": triton_decode,
}


@dataclasses.dataclass
class Task:
    """One compilation: a kernel, a variant of the problem, a config."""

    kernel: str
    arch: int
    variant: str
    dtype: str
    head_dim: int
    config: str
    tuned: bool  # the autotuner may pick it (else pruned for this head dim, compiled only with --all)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


class _Recorder:
    """Stands in for a kernel: records the keyword arguments of each launch."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append(kwargs)


def _jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _specialise(fn, kwargs: dict):
    """(signature, constexprs, attrs) of a launch of JIT function `fn` with `kwargs`, as its JIT would make them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif spec == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _config_name(config: triton.Config) -> str:
    blocks = " ".join(f"{name.removeprefix('BLOCK_')}{value}" for name, value in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}".strip()


def _problem(dtype, d, *, hq=8, hkv=2, sq=512, skv=512, p=64, causal=True, kind="shared", mask=False,
             bias=False, softcap=None, packed=False):
    """A representative problem on CPU: long enough that no config is pruned for the shape."""
    if packed:
        lengths = [sq // 2, sq]
        q, k, v = torch.randn(sum(lengths), hq, d, dtype=dtype), torch.randn(sum(lengths), hkv, d, dtype=dtype), \
            torch.randn(sum(lengths), hkv, d, dtype=dtype)
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        pk = torch.randn(3, hkv, p, d, dtype=dtype)
        return check_inputs(q, k, v, pk, pk.clone(), causal=causal, scale=None, attention_mask=None,
                            prefix_index=torch.tensor([2, 0]), prefix_lengths=torch.tensor([p, p // 2]),
                            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=sq, max_seqlen_k=sq, softcap=softcap)
    b = 2
    q = torch.randn(b, sq, hq, d, dtype=dtype).transpose(1, 2)  # as transformers passes it
    k, v = (torch.randn(b, skv, hkv, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    pk = torch.randn(hkv, p, d, dtype=dtype) if kind == "shared" else torch.randn(b, hkv, p, d, dtype=dtype)
    return check_inputs(
        q, k, v, pk, pk.clone(), causal=causal, scale=None,
        attention_mask=torch.rand(b, 1, sq, skv) > 0.5 if mask else None, prefix_index=None,
        attention_bias=torch.randn(1, hq, sq, p + skv, dtype=dtype) if bias else None, softcap=softcap)


def _record(run, arch: int) -> dict:
    """{kernel name: [launch kwargs]} of the launches `run()` makes on a GPU of compute capability `arch`, with the
    kernels replaced by recorders."""
    recorders = {name: _Recorder() for name in KERNELS}
    originals = {name: getattr(module, name) for name, module in KERNELS.items()}
    resident, device_arch = triton_decode._resident_programs, triton_common.gpu_arch
    try:
        for name, module in KERNELS.items():
            setattr(module, name, recorders[name])
        triton_decode._resident_programs = lambda *args: 132  # one program per SM of an H100: a plausible plan
        triton_common.gpu_arch = lambda t: arch
        run()
    finally:
        for name, module in KERNELS.items():
            setattr(module, name, originals[name])
        triton_decode._resident_programs, triton_common.gpu_arch = resident, device_arch
    return {name: recorder.calls for name, recorder in recorders.items() if recorder.calls}


def _tasks_of(p, decode: bool, arch: int, variant: str, compile_pruned: bool):
    """The compilations of the launches that problem `p` makes on `arch` (the decode kernels, or the prefill forward
    and the backward): every config the autotuner may pick for them (with `compile_pruned`, every config of the
    kernel's list)."""
    def run():
        if decode:
            triton_decode.decode_forward(p)
        else:
            o, lse = torch.empty_like(p.q), torch.empty(p.q.shape[:3])
            triton_prefix_attention._forward(p)
            triton_backward.backward(p, o, lse, o, True, True, True)

    dtype, d = p.q.dtype, p.q.shape[-1]
    for name, calls in _record(run, arch).items():
        kernel = getattr(KERNELS[name], name)
        fn = _jit_function(kernel)
        for kwargs in calls:
            options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
            if isinstance(kernel, triton.runtime.Autotuner):
                kernel.nargs = {}
                device_arch, triton_common.gpu_arch = triton_common.gpu_arch, lambda t: arch
                try:
                    tuned = kernel.prune_configs(kwargs)
                finally:
                    triton_common.gpu_arch = device_arch
                configs = [(c, c in tuned) for c in kernel.configs if compile_pruned or c in tuned]
            else:
                configs = [(triton.Config({}, **options), True)]
            for config, is_tuned in configs:
                signature, constexprs, attrs = _specialise(fn, {**kwargs, **config.kwargs})
                yield Task(name.strip("_").removesuffix("_kernel"), arch, variant, str(dtype).removeprefix("torch."),
                           d, _config_name(config), is_tuned, signature, constexprs, attrs,
                           dict(num_warps=config.num_warps, num_stages=config.num_stages,
                                **({"maxnreg": config.maxnreg} if config.maxnreg else {})))


def tasks(compile_pruned: bool = False, full: bool = False):
    """Every compilation of the gate, for each arch: each kernel for the common problem (causal, a shared prefix)
    and for decode (4 and 128 grouped query rows per KV head) over head dims and half dtypes; each feature that makes
    its own (heavier) specialisation at D = 128 in bf16. CI compiles the head dims where registers and shared
    memory run out (64, 128, 256; fp16 at 128), in a few minutes on two cores; `full` adds every other BLOCK_D the
    dispatcher's head dims map to (16, 32), a head dim below its BLOCK_D (80), fp16 at 64, the non-causal
    per-row-prefix specialisation, and float32 (the correctness path) at D = 128 and 256."""
    head_dims = HEAD_DIMS if full else {torch.bfloat16: (64, 128, 256), torch.float16: (128,)}
    features = {
        "softcap+mask+bias": dict(softcap=30.0, mask=True, bias=True),
        "packed+bank+lengths": dict(packed=True),
    }
    if full:
        features["not causal, per-row prefix"] = dict(causal=False, kind="row")
    for arch in ARCHS:
        for dtype, dims in head_dims.items():
            for d in dims:
                yield from _tasks_of(_problem(dtype, d), False, arch, "causal", compile_pruned)
                for rows in (4, 128):  # G * Sq grouped rows: BLOCK_M 16 and 128
                    yield from _tasks_of(_problem(dtype, d, hq=rows, hkv=1, sq=1), True, arch, f"decode G*Sq={rows}",
                                         compile_pruned)
        for variant, options in features.items():
            yield from _tasks_of(_problem(torch.bfloat16, 128, **options), False, arch, variant, compile_pruned)
            yield from _tasks_of(_problem(torch.bfloat16, 128, sq=1, **options), True, arch, f"decode {variant}",
                                 compile_pruned)
        for d in (128, 256) if full else ():
            yield from _tasks_of(_problem(torch.float32, d), False, arch, "causal", compile_pruned)


def compile_task(task: Task) -> dict:
    """Compile `task` for its arch: registers, spills, shared memory, and programs resident per SM."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
    fn = _jit_function(getattr(KERNELS["_" + task.kernel + "_kernel"], "_" + task.kernel + "_kernel"))
    row = dict(kernel=task.kernel, variant=task.variant, arch=f"sm_{task.arch}", dtype=task.dtype, D=task.head_dim,
               config=task.config, tuned=task.tuned)
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=fn, signature=task.signature, constexprs=task.constexprs,
                                          attrs=task.attrs),
                target=GPUTarget("cuda", task.arch, 32), options=task.options)
    except Exception as error:  # a compile error is a result of the gate, reported in its table
        return dict(row, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    shared = compiled.metadata.shared
    warps = task.options["num_warps"]
    return dict(row, registers=registers, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared_kb=round(shared / 1024, 1), fits=shared <= MAX_SHARED_PER_PROGRAM[task.arch],
                resident_warps=resident_programs(registers, shared, warps, ARCHS[task.arch]) * warps,
                seconds=round(time.perf_counter() - started, 1))


def run(compile_pruned: bool = False, full: bool = False, workers: int | None = None) -> list[dict]:
    """Every row of the gate; compiles in a process pool with a fresh Triton cache (so ptxas runs and reports).
    A compilation that several variants share (the same kernel, arch, specialisation and config) runs once, under
    the first variant that needs it."""
    distinct = {}
    for task in tasks(compile_pruned, full):
        key = (task.kernel, task.arch, repr(task.signature), repr(task.constexprs), repr(task.attrs),
               repr(task.options))
        distinct.setdefault(key, task)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()) as pool:
            return list(pool.map(compile_task, distinct.values()))


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| kernel | variant | arch | dtype | D | config | autotuner | regs | spills (st/ld B) | smem KB | "
             "fits | resident warps/SM |", "|" + "---|" * 12]
    for r in rows:
        picked = "may pick" if r["tuned"] else "pruned"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['dtype']} | {r['D']} | {r['config']} "
                         f"| {picked} | ERROR: {r['error']} |||||")
            continue
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['arch']} | {r['dtype']} | {r['D']} | {r['config']} | "
                     f"{picked} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared_kb']} | "
                     f"{'yes' if r['fits'] else 'NO'} | {r['resident_warps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every head dim and feature, not only CI's matrix")
    parser.add_argument("--all", action="store_true", help="also compile the configs pruned for a head dim")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--workers", type=int, help="compiler processes (default: one per CPU)")
    args = parser.parse_args()
    results = run(args.all, args.full, args.workers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
