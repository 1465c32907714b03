import os
import subprocess
import sys

import pytest

from benchmarks.bench_masking import QUICK
from benchmarks.kernel_report import VARIANTS, global_accesses, mma_kinds, occupancy, op_calls, setting
from benchmarks.sweep import parse_setting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_occupancy_follows_the_sm90_limits():
    # registers: 128 a thread x 4 warps = 16384 a block -> 4 blocks; warps: 64 / 16 = 4; shared memory: 228 KB
    assert occupancy(128, 4, 0) == 4
    assert occupancy(32, 16, 0) == 4
    assert occupancy(32, 1, 0) == 32
    assert occupancy(32, 4, 100 * 1024) == 2
    # allocation is per warp in units of 256 registers: 33 registers cost as much as 40
    assert occupancy(33, 8, 0) == occupancy(40, 8, 0) == 6
    assert occupancy(255, 8, 0) == 1


def test_mma_kinds_reads_the_matrix_instructions_of_ptx():
    wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;"
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};"
    assert mma_kinds(wgmma) == "wgmma"
    assert mma_kinds(mma) == "mma"
    assert mma_kinds(wgmma + "\n" + mma) == "wgmma+mma"
    assert mma_kinds("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];") == "-"


def test_global_accesses_read_the_widths_of_sass_loads_and_stores():
    sass = """
        /*0090*/  LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/  LDG.E.128 R8, desc[UR4][R2.64+0x200] ;
        /*00b0*/  LDG.E R12, desc[UR4][R6.64] ;
        /*00c0*/  LDG.E.U16 R13, desc[UR4][R6.64+0x2] ;
        /*00d0*/  LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*00e0*/  LDS.128 R16, [R1] ;
        /*00f0*/  STG.E.64 desc[UR4][R20.64], R4 ;
        /*0100*/  STS [R1], R4 ;
    """
    assert global_accesses(sass) == ("16Bx3+4Bx1+2Bx1", "8Bx1")
    assert global_accesses("LDS.128 R4, [R1] ;") == ("-", "-")


def test_quick_report_compiles_every_kernel_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--quick", "--no-save"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "error" not in out.stdout, out.stdout
    rows = [line for line in lines if " regs " in line]
    kernels = {line.split(" warps ")[0].split()[-1] for line in rows}
    for name in ("random_masking_kernel", "block_masking_kernel", "embed_visible_fwd_kernel",
                 "embed_visible_bwd_weight_kernel", "gather_patches_fwd_kernel", "restore_tokens_fwd_kernel",
                 "restore_tokens_bwd_kernel", "pixel_loss_kernel", "_attn_fwd_short", "_attn_bwd_short"):
        assert name in kernels, (name, kernels)
    assert lines[-1].endswith("with register spills")
    # the last column: matrix instructions, present exactly in the kernels that hold a tl.dot
    dots = ("embed_visible_fwd_kernel", "embed_visible_bwd_weight_kernel", "_attn_fwd_short", "_attn_bwd_short")
    for line in rows:
        name, mma = line.split(" warps ")[0].split()[-1], line.split()[-1]
        assert (mma != "-") == (name in dots), line


def test_quick_host_report_counts_every_op():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--host", "--quick", "--no-save"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "error" not in out.stdout, out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        if " host " in line:
            case, rest = line.split(" host ")
            us, launches, aten = rest.split("us")[0], rest.split()[2], rest.split()[5]
            rows[case.strip()] = (float(us), int(launches), int(aten))
    # twelve op calls on both shapes and block masking on the image one, each timed, each with a Triton launch
    assert len(rows) == 25, rows
    assert all(us > 0 and launches >= 1 and aten >= 1 for us, launches, aten in rows.values()), rows
    # the pixel loss: weight sums, loss, final sum forward; the gradient's scale backward
    assert rows["quick_img/pixel loss fwd+bwd"][1] == 4


def test_variants_name_real_settings_and_calls():
    # a renamed setting or op label would silently drop a variant from the report: each names an existing module
    # attribute, a value that is not its default (None: chosen per call), a call of the report, and a setting that
    # gpu_session.sh's sweeps try
    labels = {label for shape in QUICK for label, _ in op_calls(shape)}
    with open(os.path.join(REPO, "benchmarks", "gpu_session.sh")) as f:
        session = f.read()
    for label, text in VARIANTS:
        module, attr, (value,) = parse_setting(text)
        default = getattr(module, attr)
        assert default != value and (default is None or type(default) is type(value)), text
        assert label in labels, label
        assert f"--set {text.partition('=')[0]}=" in session, text
        with setting(text):
            assert getattr(module, attr) == value
        assert getattr(module, attr) == default
