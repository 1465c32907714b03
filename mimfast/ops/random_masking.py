"""MAE random masking: choose K = int(L * (1 - mask_ratio)) patches to keep per sample, uniformly at random.

Three sources of randomness, all giving the argsort semantics of the MAE reference on some per-patch keys:

- ``noise`` [N, L]: ids_shuffle = argsort(noise) (ties broken by patch index), exactly as the MAE reference. Every
  backend returns the same result for the same noise.
- ``seed`` (and ``sample_offset``): the keys are Philox4x32-10 random bits of counter (patch index, global sample
  index = sample_offset + n) under key ``seed``, so a sample's mask is a function of (seed, global sample index)
  only, independent of the batch size and of how a batch is split across devices. Every backend returns the same
  result (the torch backend computes the same Philox bits with integer tensor ops).
- neither: the torch backend draws ``torch.rand(N, L, generator=generator)`` noise (the MAE reference, so a
  model seeded like the official code masks like it); the triton backend draws one seed from ``generator`` on the
  host (no device sync) and generates the keys in-kernel. Both are reproducible given the generator state and
  differ from call to call, but the two backends give different masks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from mimfast import backend as _backend
from mimfast.backend import get_op
from mimfast.ops.gather_patches import mark_valid_index

__all__ = [
    "MaskInfo",
    "random_masking",
    "random_masking_ref",
    "random_masking_triton",
    "num_kept",
    "check_generator",
    "check_mask_ratio",
    "is_int",
    "is_number",
    "host_checks",
    "mask_from_keep",
    "draw_seed",
    "fold_seed",
    "philox4x32",
    "random_keys_ref",
]

Device = Union[torch.device, str, None]

# Largest row the triton kernel sorts in one program (keys live in registers).
TRITON_MAX_L = 16384
SEED_LIMIT = 2**63
_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_MASK64 = 2**64 - 1


class MaskInfo(NamedTuple):
    """Output of every mask generator.

    ids_keep:    [N, K] int64, indices of the kept (visible) patches, in the order the encoder sees them
    ids_restore: [N, L] int64, position of each patch in the (kept, removed) shuffled order
    mask:        [N, L] float, 1 = removed (to reconstruct), 0 = kept
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def is_int(v: object) -> bool:
    """A Python int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A Python int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_mask_ratio(mask_ratio: float) -> None:
    if not is_number(mask_ratio):
        raise TypeError(f"mask_ratio must be a number, got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def num_kept(L: int, mask_ratio: float) -> int:
    """K, the number of kept patches: int(L * (1 - mask_ratio)), as in the MAE reference."""
    check_mask_ratio(mask_ratio)
    return int(L * (1 - mask_ratio))


def check_sizes(N: int, L: int) -> None:
    for name, v in (("N", N), ("L", L)):
        if not is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if N < 0 or L <= 0:
        raise ValueError(f"need N >= 0 and L > 0, got N={N}, L={L}")


def check_seed(seed: Optional[int], sample_offset: int, N: int) -> None:
    if seed is not None:
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not is_int(sample_offset):
        raise TypeError(f"sample_offset must be an int, got {type(sample_offset).__name__}")
    if sample_offset < 0 or sample_offset + N > SEED_LIMIT:
        raise ValueError(f"sample_offset must be >= 0 with sample_offset + N <= 2**63, got {sample_offset}")
    if sample_offset and seed is None:
        raise ValueError("sample_offset only has a meaning together with seed")


def host_checks(t: torch.Tensor) -> bool:
    """Whether value checks that read ``t`` back may run: CPU tensors in eager mode only.

    Device tensors are not read back (that would sync the device every step) and compiled graphs cannot branch on
    data; the generators still return valid masks for NaN inputs (keys carry the patch index, so they stay distinct).
    """
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_noise(noise: Optional[torch.Tensor], N: int, L: int) -> None:
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
    if tuple(noise.shape) != (N, L):
        raise ValueError(f"noise must have shape [N, L] = [{N}, {L}], got {tuple(noise.shape)}")
    if noise.is_floating_point() and host_checks(noise) and torch.isnan(noise).any():
        raise ValueError("noise contains NaN")


def mask_from_keep(ids_keep: torch.Tensor, L: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] kept indices -> [N, L] mask with 1 at removed patches."""
    mask = torch.ones(ids_keep.shape[0], L, dtype=dtype, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def fold_seed(seed: int, *values: int) -> int:
    """Hash a seed and integers (epoch, rank, ...) into a new 63-bit seed, e.g. ``fold_seed(seed, epoch)``.

    Deterministic and host-only; distinct inputs give unrelated seeds.
    """
    h = _splitmix64(int(seed) & _MASK64)
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def check_generator(generator: Optional[torch.Generator]) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A fresh 63-bit seed from ``generator`` (torch's default CPU generator when None), without a device sync.

    A CPU generator draws one int64 on the host. A device generator is not read back: the seed is folded from its
    ``initial_seed()`` and its Philox offset, and the offset is advanced so the next call gets another seed.
    """
    check_generator(generator)
    gen = generator if generator is not None else torch.default_generator
    if gen.device.type == "cpu":
        return int(torch.randint(0, SEED_LIMIT - 1, (1,), generator=gen))
    offset = gen.get_offset()
    # device generators advance their Philox offset in multiples of 4
    gen.set_offset(offset + 4)
    return fold_seed(gen.initial_seed(), offset)


# a uint32 word: an int64 tensor of them, or one Python int
Word = Union[torch.Tensor, int]


def _mulhilo32(a: int, x: Word) -> tuple[Word, Word]:
    """High and low 32 bits of a * x for a < 2^32 and x int64 holding values < 2^32, without int64 overflow."""
    low_product = a * (x & 0xFFFF)  # < 2^48
    high_product = a * (x >> 16)  # < 2^48
    lo = (low_product + ((high_product & 0xFFFF) << 16)) & _MASK32
    hi = (high_product + (low_product >> 16)) >> 16
    return hi, lo


def philox4x32(
    seed: int, c0: Word, c1: Word, c2: Word, c3: Word, rounds: int = 10
) -> tuple[Word, Word, Word, Word]:
    """Philox4x32 of counters (c0, c1, c2, c3) (int64 tensors holding uint32 values, or Python ints) under the
    64-bit key ``seed``.

    Returns four int64 tensors holding uint32 values (Python ints for int counters), bit-identical to
    ``triton.language.philox``.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def key_index_bits(L: int) -> int:
    """Low bits of a random sort key that hold the patch index (at least 4, so tiny rows use the same layout)."""
    return max(4, (L - 1).bit_length())


def random_keys_ref(N: int, L: int, seed: int, sample_offset: int = 0, device: Device = None,
                    stream: int = 0) -> torch.Tensor:
    """[N, L] int64 distinct non-negative sort keys: Philox random high bits, patch index in the low bits.

    Sample n uses counters (patch j, (sample_offset + n) low 32 bits, high 32 bits, ``stream``); the triton kernel
    builds the same keys (stream 0), so argsort of these keys is what it computes.
    """
    idx = torch.arange(L, dtype=torch.int64, device=device)
    sample = torch.arange(N, dtype=torch.int64, device=device) + sample_offset
    c0 = idx.expand(N, L)
    c1 = (sample & _MASK32)[:, None].expand(N, L)
    c2 = (sample >> 32)[:, None].expand(N, L)
    r0, r1, _, _ = philox4x32(seed, c0, c1, c2, torch.full_like(c0, stream))
    bits = key_index_bits(L)
    rnd = (r0 << 31) | (r1 >> 1)
    return ((rnd >> bits) << bits) | idx


def _masking_from_order(keys: torch.Tensor, K: int) -> MaskInfo:
    # stable sort: ties (possible with low-precision noise) resolve by index, the same on every backend
    ids_shuffle = torch.argsort(keys, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :K].contiguous()
    return MaskInfo(ids_keep, ids_restore, mask_from_keep(ids_keep, keys.shape[1]))


def random_masking_ref(
    N: int,
    L: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
) -> MaskInfo:
    """Reference: ids_shuffle = argsort(noise) ascending, the first K are kept.

    Equivalent PyTorch::

        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :K]
        mask = torch.ones(N, L); mask[:, :K] = 0; mask = torch.gather(mask, 1, ids_restore)

    With ``seed`` the noise is replaced by :func:`random_keys_ref` (the keys the triton kernel sorts).
    """
    K = num_kept(L, mask_ratio)
    if noise is None and seed is not None:
        noise = random_keys_ref(N, L, seed, sample_offset, device)
    elif noise is None:
        noise = uniform_noise(N, L, generator, device)
    return _masking_from_order(noise, K)


def uniform_noise(N: int, L: int, generator: Optional[torch.Generator], device: Device) -> torch.Tensor:
    """[N, L] uniform noise from ``generator`` (torch's default one when None). The generator overload only when
    one is given: it takes no symbolic sizes (a compiled call with a changing batch)."""
    return torch.rand(N, L, device=device) if generator is None else torch.rand(N, L, generator=generator,
                                                                                 device=device)


_op = get_op("random_masking")
_op.register("torch")(random_masking_ref)

TRITON_NOISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the triton launchers (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def triton_masking_reasons(L: int, noise: Optional[torch.Tensor], device: Device) -> list[str]:
    """Why the random-masking kernel cannot run a call (shared by every generator built on it)."""
    reasons: list[str] = []
    if L > TRITON_MAX_L:
        reasons.append(f"the triton kernel sorts a row in one program: L <= {TRITON_MAX_L}, got {L}")
    if noise is not None and noise.dtype not in TRITON_NOISE_DTYPES:
        reasons.append(f"the triton kernel sorts 32-bit float keys: noise must be float32/float16/bfloat16, "
                       f"got {noise.dtype}")
    if noise is None and device is None:
        # no tensor and no device in the call: the generic device check saw nothing, so check the default device
        reasons += _backend.triton_reasons([_default_device()])
    return reasons


def _triton_reasons(N: int, L: int, mask_ratio: float, *, noise: Optional[torch.Tensor] = None,
                    device: Device = None, **_: object) -> list[str]:
    return triton_masking_reasons(L, noise, device)


def _random_masking_launch(
    noise: Optional[torch.Tensor], N: int, L: int, K: int, seed: int, sample_offset: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mimfast.kernels.random_masking import launch_random_masking

    ids_keep = _empty((N, K), torch.int64, device)
    ids_restore = _empty((N, L), torch.int64, device)
    mask = _empty((N, L), torch.float32, device)
    launch_random_masking(ids_keep, ids_restore, mask, noise=noise, seed=seed, sample_offset=sample_offset, K=K,
                          index_bits=key_index_bits(L))
    return ids_keep, ids_restore, mask


# compiled graphs trace through the custom op; eager calls launch directly, since the outputs are integer and a
# mask (nothing to differentiate) and the custom op's dispatch costs more host time than the kernel takes
_random_masking_kernel_op = torch.library.custom_op("mimfast::random_masking", mutates_args=())(
    _random_masking_launch)


@_random_masking_kernel_op.register_fake
def _(noise: Optional[torch.Tensor], N: int, L: int, K: int, seed: int, sample_offset: int, device: torch.device):
    return (
        torch.empty(N, K, dtype=torch.int64, device=device),
        torch.empty(N, L, dtype=torch.int64, device=device),
        torch.empty(N, L, dtype=torch.float32, device=device),
    )


def _default_device() -> torch.device:
    # the device factory functions use when none is given; a probe tensor keeps this traceable by torch.compile
    return torch.empty(0).device


def resolve_device(noise: Optional[torch.Tensor], device: Device) -> torch.device:
    if noise is not None:
        return noise.device
    return torch.device(device) if device is not None else _default_device()


def random_masking_kept_triton(
    N: int,
    L: int,
    K: int,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
) -> MaskInfo:
    """Triton launcher with the kept count K given directly (generators with their own count rule use it)."""
    dev = resolve_device(noise, device)
    if noise is None and seed is None:
        if torch.compiler.is_compiling():
            # a seed read from the generator here would be one constant of the graph (the same mask every call,
            # and a graph break reading the generator): the graph draws the noise instead
            noise = uniform_noise(N, L, generator, dev)
        else:
            seed = draw_seed(generator)
    launch = _random_masking_kernel_op if torch.compiler.is_compiling() else _random_masking_launch
    ids_keep, ids_restore, mask = launch(noise, N, L, K, seed or 0, sample_offset, dev)
    return MaskInfo(ids_keep, ids_restore, mask)


def random_masking_triton(
    N: int,
    L: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
) -> MaskInfo:
    """One launch: per sample, build keys (from noise or in-kernel Philox), sort them, write the three outputs."""
    return random_masking_kept_triton(N, L, num_kept(L, mask_ratio), noise=noise, generator=generator,
                                      device=device, seed=seed, sample_offset=sample_offset)


_op.register("triton", reasons=_triton_reasons)(random_masking_triton)


def random_masking(
    N: int,
    L: int,
    mask_ratio: float,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    backend: Optional[str] = None,
) -> MaskInfo:
    """Per-sample uniform random masking for N samples of L patches.

    Returns :class:`MaskInfo`: ids_keep [N, K] int64 (kept patches in shuffled order), ids_restore [N, L] int64,
    mask [N, L] float32 with 1 = removed, K = int(L * (1 - mask_ratio)).

    - ``noise`` [N, L]: exactly the argsort semantics of the MAE reference (ties broken by patch index); the
      triton backend takes float32/float16/bfloat16 noise. NaN noise is rejected on CPU; device noise is not read
      back for the check (see :func:`host_checks`).
    - ``seed`` (int in [0, 2**63)) and ``sample_offset``: sample n's mask is a function of (seed, sample_offset
      + n) only, identical on every backend; fold an epoch or rank into the seed with :func:`fold_seed`.
    - otherwise randomness comes from ``generator`` (torch's default generator when None): see the module
      docstring. The triton backend never syncs the device. Under ``torch.compile`` without a generator, the
      graph draws ``noise`` with ``torch.rand`` (so compiled and eager calls draw differently from the same
      state; pass ``seed`` or ``noise`` for the same masks); a ``generator`` there breaks the graph. Outside
      torch.compile a CUDA graph records the drawn seed as a constant, so every replay repeats the mask: inside
      captured code pass ``noise`` drawn by captured torch RNG.

    Equivalent PyTorch::

        noise = torch.rand(N, L, device=device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :K]
        mask = torch.ones(N, L).scatter_(1, ids_keep, 0.0)
    """
    check_sizes(N, L)
    check_mask_ratio(mask_ratio)
    _check_noise(noise, N, L)
    check_seed(seed, sample_offset, N)
    check_generator(generator)
    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed, not both")
    if noise is not None and device is not None and noise.device.type != torch.device(device).type:
        raise ValueError(f"noise is on {noise.device} but device={device}")
    if device is None and noise is None and generator is not None:
        device = generator.device  # the masks live where their randomness is drawn
    info = _op(N, L, mask_ratio, noise=noise, generator=generator, device=device, seed=seed,
                sample_offset=sample_offset, backend=backend)
    mark_valid_index(info.ids_keep, L)
    mark_valid_index(info.ids_restore, L)
    return info
