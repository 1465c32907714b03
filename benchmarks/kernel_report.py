"""Static resource report of every Triton kernel as the ops launch it at the benchmark shapes, for an H100 (sm_90),
on a machine without a GPU.

    python -m benchmarks.kernel_report                # MAE ViT-B/L/H and VideoMAE-B shapes, writes results/
    python -m benchmarks.kernel_report --quick --no-save

The ops run on CPU tensors with Triton's driver replaced by one that reports an sm_90 target and with every kernel
launch turned into a compile-only call, so each kernel is compiled with exactly the specialisation (constexprs,
integer and pointer-alignment attributes, warps, stages) a real launch of those shapes would get; nothing is
executed. The cubin's resource usage (cuobjdump, shipped with Triton) gives registers and local memory (spills)
per thread, and the compiled kernel its shared memory; its PTX shows which matrix instructions its dots became
(``wgmma``: Hopper's warpgroup MMA; ``mma``: the older warp-level ``mma.sync``, which a dot gets when its tile is
too small for a warpgroup or its operands' layout does not allow ``wgmma``). From those, resident blocks and warps
per SM follow from the sm_90 limits: 65536 registers (allocated per warp in units of 256), 64 warps, 32 blocks and
228 KB of shared memory (1 KB of it reserved per block). The SASS gives the widths of the global loads and stores:
16-byte vectors, or one value at a time.

Each op call is compiled at the defaults and again under the non-default value of every setting in
:data:`VARIANTS` that changes its kernels' code (the boolean paths the GPU sweeps time); the kernels a variant
changes get their own rows, labelled ``[ATTR=value]``.

Spills and occupancy are what can be checked without a GPU; they are not timings. Run it with the Triton version
the GPU machine uses, since register allocation changes between versions.

    python -m benchmarks.kernel_report --host         # host work per op call, written to results/host_report.*

``--host`` times the host side of every op call instead: the same calls with each shape's token counts (patch grid,
kept patches, sequence lengths: the code paths of the real shapes) on batch 2, 2 x 2 patches and 64-wide tokens
(one 64-dim head), so the CPU tensors hold no arithmetic worth counting, and each Triton launch stopping after the
kernel lookup (everything a real launch does on the host except the driver's launch call, a few microseconds
each). Reported per call: host microseconds (the best of 7 interleaved sweeps' means over 20 calls), Triton
launches and ATen ops, forward and backward together (packed attention checks CPU cu_seqlens on the host at every
call; a device cu_seqlens is checked on the device once per tensor). In an eager benchmark a call whose host time
exceeds its device time is timed at its host time; inside a training step the host runs ahead of the GPU and it
does not count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_masking import FULL, QUICK, Shape
from benchmarks.harness import RESULTS_DIR, environment
from benchmarks.sweep import parse_setting

SM90 = {"regs": 65536, "warps": 64, "blocks": 32, "smem": 228 * 1024, "smem_reserved": 1024}


@dataclass
class KernelRow:
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    regs: int
    spill_bytes: int
    smem_bytes: int
    blocks_per_sm: int
    warps_per_sm: int
    mma: str  # matrix instructions in the PTX: "wgmma", "mma", "wgmma+mma" or "-" (no dot)
    global_ld: str = ""  # global load instructions in the SASS by width, e.g. "16Bx3+4Bx1" (see global_accesses)
    global_st: str = ""  # global store instructions likewise


def mma_kinds(ptx: str) -> str:
    """Which tensor-core instructions ``ptx`` issues: "wgmma", "mma" (mma.sync), both joined by "+", or "-"."""
    kinds = [name for name, pattern in (("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync"))
             if re.search(pattern, ptx)]
    return "+".join(kinds) or "-"


_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def global_accesses(sass: str) -> tuple[str, str]:
    """(loads, stores): the global-memory instructions of ``sass`` by access width a thread, widest first, as
    "16Bx3+4Bx1" ("-" for none). Loads are LDG and LDGSTS (cp.async into shared memory), stores STG; each
    instruction is counted once where it stands in the code, not per loop iteration. A value-by-value access
    (2- or 4-byte) moves the same bytes in 4 to 8 times the instructions of a 16-byte vector one."""
    counts: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for m in re.finditer(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        suffixes = m.group(2).split(".")
        width = next((_WIDTH_BYTES[x] for x in suffixes if x in _WIDTH_BYTES), 4)
        kind = counts["st" if m.group(1) == "STG" else "ld"]
        kind[width] = kind.get(width, 0) + 1
    return tuple("+".join(f"{w}Bx{n}" for w, n in sorted(c.items(), reverse=True)) or "-"
                 for c in (counts["ld"], counts["st"]))  # type: ignore[return-value]


def cubin_sass(cubin: bytes) -> str:
    """The SASS of ``cubin``, disassembled with the cuobjdump shipped with Triton."""
    return _cuobjdump(cubin, "-sass")


def occupancy(regs: int, warps: int, smem: int) -> int:
    """Resident blocks per sm_90 SM for a kernel of ``warps`` warps using ``regs`` registers a thread and ``smem``
    bytes of shared memory."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM90["regs"] // (per_warp * warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    return max(0, min(SM90["blocks"], SM90["warps"] // warps, by_regs, by_smem))


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread: spills) of the kernel in ``cubin``, read with the
    cuobjdump shipped with Triton."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-2000:]}")
    return int(usage.group(1)), int(usage.group(3))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, flag, path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {(out.stdout + out.stderr)[-2000:]}")
    return out.stdout


@contextlib.contextmanager
def compile_only(capability: int = 90) -> Iterator[list[tuple[str, Any]]]:
    """Inside: Triton targets an sm_<capability> GPU, every launch compiles without running, and CPU tensors
    dispatch to the triton backend. Yields the list of (kernel name, compiled kernel) filled as launches happen."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import mimfast.backend as backend

    # the module, not the function of the same name that mimfast.ops exports
    attention = importlib.import_module("mimfast.ops.visible_attention")

    class Sm90Driver:  # the calls JITFunction.run makes of the active driver
        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: Any = None) -> int:
            return 0

        def get_current_target(self) -> Any:
            return GPUTarget("cuda", capability, 32)

        def get_active_torch_device(self) -> torch.device:
            return torch.device("cpu")

    compiled: list[tuple[str, Any]] = []
    original_run = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    saved = (backend.triton_interpret, attention.triton_interpret, backend.interpreter_problem)
    saved_driver = getattr(driver, "_active", None)
    driver.set_active(Sm90Driver())
    JITFunction.run = run
    # CPU tensors reach the kernels as under the interpreter; attention's bf16 refusal on CPU is for the
    # interpreter's dots, and nothing runs here
    backend.triton_interpret = lambda: True
    attention.triton_interpret = lambda: False
    backend.interpreter_problem = lambda: []  # nothing is interpreted here
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        backend.triton_interpret, attention.triton_interpret, backend.interpreter_problem = saved
        driver._active = saved_driver  # a machine without a GPU has no default driver to reset to
        del triton


def shuffles(N: int, L: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep, ids_restore, mask) of a valid random masking, built in torch (the compile-only masking kernel
    leaves its outputs unset), registered as the masking ops register theirs: the ops skip the value checks that
    CPU indices would otherwise get and device ones do not."""
    from mimfast.ops.gather_patches import mark_valid_index

    ids_shuffle = torch.argsort(torch.rand(N, L), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    ids_keep = ids_shuffle[:, :K].contiguous()
    mark_valid_index(ids_keep, L)
    mark_valid_index(ids_restore, L)
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


def op_calls(s: Shape, head_dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, Callable[[], Any]]]:
    """(label, call) for every op of the fused MAE / VideoMAE step at shape ``s``, forward and backward. Inputs are
    built once, outside the calls, and the backward passes return their gradients (``torch.autograd.grad``), so a
    call is the op's own work only. ``head_dtype``: the fused head's inputs (its GEMMs are torch's, and so run on
    CPU tensors even in compile-only mode, where bf16 ones take milliseconds)."""
    from mimfast.ops import (
        block_masking,
        embed_visible,
        fused_head_masked_pixel_loss,
        gather_patches,
        masked_pixel_loss,
        ragged_random_masking,
        random_masking,
        restore_tokens,
        videomae_pixel_loss,
        visible_attention,
    )
    from mimfast.ops.fused_head_loss import masked_ids_from_restore
    from mimfast.ops.gather_patches import mark_valid_index

    N, L, K, P = s.batch, s.grid, s.kept, s.patch_dim
    enc, dec = s.width, s.decoder_width
    bf16 = torch.bfloat16
    video = bool(s.frames)
    imgs = torch.randn(s.image_shape())
    imgs_bf16 = imgs.to(bf16)
    imgs_grad = imgs_bf16.clone().requires_grad_()  # images that take a gradient: the scatter back
    tub = s.tubelet
    ids_keep, ids_restore, mask = shuffles(N, L, K)
    # as the masking ops' outputs are in training: known to be in range, so the ops skip their index checks
    mark_valid_index(ids_keep, L)
    mark_valid_index(ids_restore, L)
    ids_masked = masked_ids_from_restore(ids_restore, K)
    kernel = (s.tubelet, s.patch, s.patch) if video else (s.patch, s.patch)
    weight = torch.randn(enc, s.channels, *kernel, requires_grad=True)
    bias = torch.zeros(enc, requires_grad=True)
    pos = torch.randn(1, 1 + L, enc)

    def step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], Any]:
        grad_out: list[Optional[torch.Tensor]] = []

        def call() -> Any:
            out = forward()
            if not grad_out:
                grad_out.append(None if out.dim() == 0 else torch.ones_like(out))
            return torch.autograd.grad(out, leaves, grad_out[0])

        return call

    def embed() -> torch.Tensor:
        with torch.autocast("cpu", dtype=bf16):
            return embed_visible(imgs, ids_keep, weight, bias, pos, s.patch, tub, backend="triton")

    x_vis = torch.randn(N, 1 + K, dec, dtype=bf16, requires_grad=True)
    mask_token = torch.zeros(1, 1, dec, requires_grad=True)
    dec_pos = torch.randn(1, 1 + L, dec)
    learned_pos = dec_pos.clone().requires_grad_()

    if video:
        pred = torch.randn(N, L - K, P, dtype=bf16, requires_grad=True)
        bool_mask = torch.zeros(N, L, dtype=torch.bool)
        bool_mask[:, : L - K] = True

        def loss() -> torch.Tensor:
            return videomae_pixel_loss(pred, imgs, bool_mask, s.patch, tub, backend="triton")
    else:
        pred = torch.randn(N, L, P, dtype=bf16, requires_grad=True)

        def loss() -> torch.Tensor:
            return masked_pixel_loss(pred, imgs, mask, s.patch, norm_pix=True, backend="triton")

    hidden = torch.randn(N, L, dec, dtype=head_dtype, requires_grad=True)
    head_w = torch.randn(P, dec, dtype=head_dtype, requires_grad=True)
    head_b = torch.zeros(P, dtype=head_dtype, requires_grad=True)

    def head() -> torch.Tensor:
        return fused_head_masked_pixel_loss(hidden, head_w, head_b, imgs, None, s.patch, ids_masked=ids_masked,
                                            norm_pix=True, tubelet_size=tub, backend="triton")

    def heads_of(width: int) -> tuple[int, int]:  # (heads, head dim): 64-wide heads, one narrower head below 64
        return max(1, width // 64), min(64, width)

    def attention(lengths: list[int]) -> Callable[[], Any]:
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = (torch.randn(sum(lengths), *heads_of(enc), dtype=bf16, requires_grad=True) for _ in range(3))
        return step(lambda: visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), backend="triton"),
                    [q, k, v])

    def dense_attention(S: int, width: int) -> Callable[[], Any]:
        q, k, v = (torch.randn(N, S, *heads_of(width), dtype=bf16, requires_grad=True) for _ in range(3))
        return step(lambda: visible_attention(q, k, v, backend="triton"), [q, k, v])

    gen = torch.Generator().manual_seed(0)
    ratios = torch.empty(N).uniform_(0.6, 0.9, generator=gen)
    ragged = [1 + int(L * (1 - r)) for r in ratios.tolist()]
    calls = [
        ("random_masking", lambda: random_masking(N, L, s.mask_ratio, backend="triton")),
        ("ragged_random_masking", lambda: ragged_random_masking(N, L, ratios, backend="triton")),
        *([] if video else [("block_masking", lambda: block_masking(N, (s.img // s.patch,) * 2, int(0.4 * L), 16,
                                                                     backend="triton"))]),
        ("embed_visible fwd+bwd", step(embed, [weight, bias])),
        ("gather_patches", lambda: gather_patches(imgs_bf16, ids_keep, s.patch, tub, backend="triton")),
        ("gather_patches fwd+bwd", step(lambda: gather_patches(imgs_grad, ids_keep, s.patch, tub, backend="triton"),
                                        [imgs_grad])),
        ("restore_tokens fwd+bwd", step(lambda: restore_tokens(x_vis, ids_restore, mask_token, dec_pos,
                                                               backend="triton"), [x_vis, mask_token])),
        ("restore_tokens fwd+bwd, pos grad", step(lambda: restore_tokens(x_vis, ids_restore, mask_token, learned_pos,
                                                                         backend="triton"),
                                                  [x_vis, mask_token, learned_pos])),
        ("pixel loss fwd+bwd", step(loss, [pred])),
        ("fused head + loss", step(head, [hidden, head_w, head_b])),
        (f"attention encoder, {1 + K} tokens", dense_attention(1 + K, enc)),
        ("attention encoder, ragged 0.6-0.9", attention(ragged)),
        (f"attention decoder, {1 + L} tokens", dense_attention(1 + L, dec)),
    ]
    return calls


# Settings the GPU sweeps try (benchmarks/gpu_session.sh) that change a kernel's code, not only its tile, written as
# the sweeps' --set takes them: each call is compiled once more with the value that is not the default, and the
# kernels that differ are listed as their own rows (label "[ATTR=value]"), so the compiler has seen every path a
# sweep may time.
VARIANTS: list[tuple[str, str]] = [
    ("embed_visible fwd+bwd", "mimfast.ops.embed_visible.WEIGHT_GRAD_VIA_GEMM=False"),
    ("gather_patches", "mimfast.kernels.gather_patches.TRANSPOSE=False"),
    ("gather_patches fwd+bwd", "mimfast.kernels.gather_patches.TRANSPOSE=False"),
    ("pixel loss fwd+bwd", "mimfast.kernels.pixel_loss.TRANSPOSE=True"),
    ("pixel loss fwd+bwd", "mimfast.kernels.pixel_loss.TRANSPOSE=False"),
    ("pixel loss fwd+bwd", "mimfast.kernels.pixel_loss.LATE_PRED=True"),
    ("pixel loss fwd+bwd", "mimfast.kernels.pixel_loss.CHANNEL_SUMS=True"),
    ("restore_tokens fwd+bwd", "mimfast.kernels.restore_tokens.BWD_PREFETCH=True"),
]


@contextlib.contextmanager
def setting(text: str) -> Iterator[None]:
    """The single-valued setting ``text`` ("package.module.ATTR=value", parsed as benchmarks.sweep's --set) in force
    inside the block."""
    module, attr, (value,) = parse_setting(text)
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


def report(shapes: list[Shape], arch_capability: int = 90,
           failures: Optional[list[str]] = None) -> list[KernelRow]:
    """Compile every op call at every shape, at the defaults and then under each of its :data:`VARIANTS`; an op's
    refusal of a shape (BackendUnavailableError) is reported and skipped, any other error (a kernel the compiler
    rejects) also appended to ``failures``."""
    from mimfast.backend import BackendUnavailableError

    rows: list[KernelRow] = []
    with compile_only(arch_capability) as compiled:
        for s in shapes:
            for label, call in op_calls(s):
                seen: set[tuple] = set()  # kernels listed for this call: a variant lists only those it changes
                runs = [(label, contextlib.nullcontext())] + [
                    (f"{label} [{text.rpartition('.')[2]}]", setting(text))
                    for target, text in VARIANTS if target == label]
                for run_label, context in runs:
                    compiled.clear()
                    try:
                        with context:
                            call()
                    except Exception as e:
                        print(f"{s.name:<14} {run_label:<36} error: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]}")
                        if failures is not None and not isinstance(e, BackendUnavailableError):
                            failures.append(f"{s.name}/{run_label}: {type(e).__name__}")
                        continue
                    for name, kernel in compiled:
                        meta = kernel.metadata
                        key = (name, meta.num_warps, meta.num_stages, kernel.asm["ptx"].__hash__())
                        if key in seen:
                            continue
                        seen.add(key)
                        regs, spills = cubin_usage(kernel.asm["cubin"])
                        blocks = occupancy(regs, meta.num_warps, meta.shared)
                        ld, st = global_accesses(cubin_sass(kernel.asm["cubin"]))
                        row = KernelRow(f"{s.name}/{run_label}", name, meta.num_warps, meta.num_stages, regs, spills,
                                        meta.shared, blocks, blocks * meta.num_warps, mma_kinds(kernel.asm["ptx"]),
                                        ld, st)
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


@dataclass
class HostRow:
    case: str
    host_us: float  # per call, forward and backward, Triton launches up to the driver call
    launches: int  # Triton launches per call
    aten_ops: int  # ATen operators per call


class _AtenCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def host_report(shapes: list[Shape], rounds: int = 7, calls: int = 20) -> list[HostRow]:
    """Every op call of every shape, timed in ``rounds`` interleaved sweeps of ``calls`` calls each: a call's time is
    its best sweep's mean (a busy moment of the machine hits one sweep of every call, not every sweep of one)."""
    timed: list[tuple[str, Callable[[], Any], int, int]] = []
    with compile_only() as compiled:
        for s in shapes:
            # the shape's token counts on tiny tensors: 2 x 2 patches, 64-wide tokens (one head of 64)
            small = dataclasses.replace(s, batch=2, img=s.img // s.patch * 2, patch=2, width=64, decoder_width=64)
            for label, call in op_calls(small, head_dtype=torch.float32):
                try:
                    call()  # compiles
                except Exception as e:
                    print(f"{s.name:<14} {label:<36} error: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                compiled.clear()
                with _AtenCount() as count:
                    call()
                timed.append((f"{s.name}/{label}", call, len(compiled), count.ops))
        best = [float("inf")] * len(timed)
        for _ in range(rounds):
            for i, (_, call, _, _) in enumerate(timed):
                compiled.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                best[i] = min(best[i], (time.perf_counter() - t0) / calls)
        compiled.clear()
    rows = [HostRow(case, t * 1e6, launches, ops) for (case, _, launches, ops), t in zip(timed, best)]
    for row in rows:
        print(format_host_row(row), flush=True)
    return rows


def format_host_row(r: HostRow) -> str:
    return f"{r.case:<52} host {r.host_us:7.1f} us  {r.launches:>2} Triton launches  {r.aten_ops:>3} ATen ops"


def write_host(rows: list[HostRow]) -> str:
    import platform

    import triton

    env = environment(torch.device("cpu"))
    env.update(triton=triton.__version__, cpu=_cpu_name(), python=platform.python_version())
    md = ["# host_report", "",
          f"{env['cpu']} · Python {env['python']} · torch {env['torch']} · triton {env['triton']} · commit "
          f"{env['commit']} · {env['date']}", "",
          "Host work of one call, forward and backward (each shape's token counts on batch 2, 2 x 2 patches and "
          "64-wide tokens; Triton launches stop after the kernel lookup, before the driver's launch call).", "",
          "| case | host us | Triton launches | ATen ops |", "|---|---|---|---|"]
    md += [f"| {r.case} | {r.host_us:.1f} | {r.launches} | {r.aten_ops} |" for r in rows]
    return _save("host_report", env, rows, md)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def format_row(r: KernelRow) -> str:
    return (f"{r.case:<52} {r.kernel:<32} warps {r.num_warps:>2} stages {r.num_stages} regs {r.regs:>3} "
            f"spill {r.spill_bytes:>4} B smem {r.smem_bytes / 1024:6.1f} KB  {r.blocks_per_sm:>2} blocks "
            f"{r.warps_per_sm:>2} warps/SM  ld {r.global_ld:<14} st {r.global_st:<10} {r.mma}")


def _save(name: str, env: dict[str, Any], rows: list[Any], md: list[str]) -> str:
    """Write results/<name>.json (env and rows) and results/<name>.md (the lines ``md``); returns the .md path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{name}.json"), "w") as f:
        json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    path = os.path.join(RESULTS_DIR, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def write(rows: list[KernelRow]) -> str:
    import triton

    env = environment(torch.device("cpu"))
    env.update(device="sm_90 (compiled, not run)", triton=triton.__version__)
    md = ["# kernel_report", "",
          f"sm_90 · triton {env['triton']} · commit {env['commit']} · {env['date']} (compiled for the target, not run)",
          "", "Global loads and stores: instructions in the code by bytes a thread moves (16B is a vector access, "
          "2B or 4B one value at a time), each counted once where it stands, not per loop iteration.", "",
          "| case | kernel | warps | stages | regs | spill B | smem KB | blocks/SM | warps/SM | global ld "
          "| global st | MMA |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r.case} | {r.kernel} | {r.num_warps} | {r.num_stages} | {r.regs} | {r.spill_bytes} | "
           f"{r.smem_bytes / 1024:.1f} | {r.blocks_per_sm} | {r.warps_per_sm} | {r.global_ld} | {r.global_st} | "
           f"{r.mma} |" for r in rows]
    return _save("kernel_report", env, rows, md)


def main() -> None:
    # before any kernel module is imported: they must be real JIT functions, not interpreted ones (set here, not at
    # import, so importing this module leaves the environment of its importer alone)
    os.environ["TRITON_INTERPRET"] = "0"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny shape")
    ap.add_argument("--cases", default=None, help="comma-separated shape names (mae_vit_b16, videomae_b16, ...)")
    ap.add_argument("--no-save", action="store_true", help="print only, do not write benchmarks/results/")
    ap.add_argument("--host", action="store_true", help="host time, Triton launches and ATen ops per op call")
    args = ap.parse_args()
    shapes = QUICK if args.quick else FULL
    if args.cases:
        wanted = args.cases.split(",")
        shapes = [s for s in shapes if s.name in wanted]
    if args.host:
        host_rows = host_report(shapes)
        if not host_rows:
            raise SystemExit("no op call ran (see the errors above)")
        if not args.no_save:
            print("wrote", write_host(host_rows))
        return
    failures: list[str] = []
    rows = report(shapes, failures=failures)
    if not rows:
        raise SystemExit("no kernel was compiled (see the errors above)")
    spilled = [r for r in rows if r.spill_bytes]
    print(f"{len(rows)} kernel configurations, {len(spilled)} with register spills")
    if failures:  # before saving: a report missing kernels is not one to keep
        raise SystemExit(f"{len(failures)} op calls failed to compile: {', '.join(failures)}")
    if not args.no_save:
        print("wrote", write(rows))


if __name__ == "__main__":
    main()
