"""SnAp-1's step on CPU as a few C loops: cell Jacobian, CSR products, and the influence
update with its gradient in one pass over J.

Per step SnAp-1 computes, for every example b, unit u and kept parameter p of u (part A:
``[W columns | bias]`` on ``[x, 1]``, part B: ``U columns`` on ``h``)::

    J[:, b, u, p] <- D[b, u] J[:, b, u, p] + m[b, u, :, gate(p)] * src[b, col(p)]
    g[u, p]       += sum_b eps[b, u, :] . J[:, b, u, p]

with ``D[b, u] = E[b, u] + (sum_g dU[b, u, :, g] U_g[u, u]) e_0^T`` the own-unit ``c x c``
block of the state Jacobian. ``snap1_step`` does both in one loop over units: J is read and
written once a step (the memory floor), ``eps = dL_t/ds_t`` from the read-out (computed before
the update) multiplies each new entry while it is in a register, and the inputs are loaded by
column index from ``x`` and ``h`` instead of being gathered into a tensor first.

Layout: J is stored unit-major with the examples innermost, ``(c, H, G, nP, B)`` per part, so
that one entry's examples are one vector and a gathered input column (of ``[x, 1]^T`` or
``h^T``) is one contiguous load. The sums over examples come out of a shuffle tree, a block of
entries at a time (``_tree``). Batches 8, 16 and 32 have loops with compile-time vector widths;
others run generic loops.

``snap1_csr`` is a sparse network's forward product in the same examples-innermost layout;
``snap1_cell`` the GRU/LSTM step and its Jacobian pieces from the gates' activations (the
nonlinearities stay vectorised torch operations).

The source, ``snap1_kernels.c`` beside this module, is compiled once per machine with the
system C compiler (``$CC``, else ``cc`` or ``gcc``; about a second) into
``~/.cache/hpsweep/snap1`` (``$XDG_CACHE_HOME``) and called through :mod:`ctypes`, which
releases the GIL: several threads run disjoint unit ranges.
:func:`library` returns None where nothing compiles; SnAp-1 then runs its eager torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["BATCHES", "SOURCE", "cell", "csr", "library", "step"]

#: batch sizes with their own compiled loops (others: generic ones)
BATCHES = (8, 16, 32)

#: the C source of the loops (shuffle trees generated below)
_KERNELS = Path(__file__).with_name("snap1_kernels.c").read_text()


def _tree(dtype: str, nb: int) -> str:
    """C for ``tree_<dtype>_<nb>(t)``: lane i of the result is the sum of the lanes of ``t[i]``.
    Each level adds the two halves of every vector's segments, pairing vectors: nb - 1 adds."""
    vt = f"v{dtype}_{nb}"
    lines = [f"static inline {vt} tree_{dtype}_{nb}(const {vt} *t) {{"]
    names, seg, level = [f"t[{i}]" for i in range(nb)], nb, 0
    while len(names) > 1:
        per, half, out = nb // seg, seg // 2, []
        for k in range(0, len(names), 2):
            lo, hi = [], []
            for lane in range(nb):
                j, o = divmod(lane, half)
                base = j * seg if j < per else nb + (j - per) * seg
                lo.append(base + o)
                hi.append(base + half + o)
            name, x, y = f"z{level}_{k // 2}", names[k], names[k + 1]
            lines.append(f"    const {vt} {name} = __builtin_shufflevector({x}, {y}, {', '.join(map(str, lo))})"
                         f" + __builtin_shufflevector({x}, {y}, {', '.join(map(str, hi))});")
            out.append(name)
        names, seg, level = out, half, level + 1
    lines += [f"    return {names[0]};", "}"]
    return "\n".join(lines)


def _trees() -> str:
    out = []
    for dtype, ctype in (("f32", "float"), ("f64", "double")):
        for nb in BATCHES:
            out.append(f"typedef {ctype} v{dtype}_{nb} __attribute__((vector_size({nb} * sizeof({ctype}))));")
            out.append(_tree(dtype, nb))
    return "\n".join(out)


SOURCE = _KERNELS.replace("@TREES@", _trees())


#: ``-fassociative-math`` (with the two flags it needs) lets the sums over examples run in
#: vector lanes; NaN and infinity handling is unchanged (no ``-ffast-math``)
FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math"]
#: tried first: this CPU's instruction set (on x86, 512-bit vectors where it has them)
NATIVE_FLAGS = ["-march=native"] + (["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else [])

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool = None
_pool_size = 0


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hpsweep" / "snap1"


def _cpu_flags() -> str:
    """The CPU's feature flags: ``-march=native`` code is only reused on the same kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or sys.platform == "win32":
        return None
    parts = [SOURCE, compiler, *FLAGS, *NATIVE_FLAGS, _cpu_flags(), platform.machine()]
    key = hashlib.sha256("\0".join(parts).encode())
    target = _cache_dir() / f"snap1_{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=target.parent))
        except OSError:  # no writable cache: build in a temporary directory, for this process
            work = Path(tempfile.mkdtemp())
            target = work / target.name
        src, out = work / "snap1.c", work / "snap1.so"
        src.write_text(SOURCE)
        for flags in (NATIVE_FLAGS + FLAGS, FLAGS):  # portable code where -march=native is refused
            result = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if result.returncode == 0:
                break
        if result.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            tail = " ".join(result.stderr.strip().splitlines()[-3:])
            warnings.warn(f"SnAp-1: the C loops do not compile ({compiler}: {tail}); using eager updates",
                          RuntimeWarning, stacklevel=3)
            return None
        os.replace(out, target)  # atomic: a concurrent build of the same source is harmless
        if target.parent != work:
            shutil.rmtree(work, ignore_errors=True)
    lib = ctypes.CDLL(str(target))
    i, p = ctypes.c_int, ctypes.c_void_p
    for dt in ("f32", "f64"):
        for suffix in ["", *(f"_b{b}" for b in BATCHES)]:
            fn = getattr(lib, f"snap1_step_{dt}_c1{suffix}"), getattr(lib, f"snap1_step_{dt}_c2{suffix}")
            for f in fn:
                f.restype = None
                f.argtypes = [i] * 6 + [p] * 14 + [i, i, i]
    for dt in ("f32", "f64"):
        for suffix in ["", *(f"_b{b}" for b in BATCHES)]:
            fn = getattr(lib, f"snap1_csr_{dt}{suffix}")
            fn.restype, fn.argtypes = None, [i, i, i, p, p, p, p]
        fn = getattr(lib, f"snap1_cell_{dt}")
        i64 = ctypes.c_int64
        fn.restype, fn.argtypes = None, [i, i, i, p, p, i64, i64, p, p, p, p, p, p, p]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled loops (built on first use, then cached on disk), or None."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError):
                _lib = None
        return _lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def step(lib: ctypes.CDLL, c: int, B: int, H: int, G: int, nA: int, nB: int, JA: torch.Tensor,
         JB: torch.Tensor, E: torch.Tensor, mA: torch.Tensor, mB: torch.Tensor, udiag: torch.Tensor,
         srcA: torch.Tensor, colsA: torch.Tensor | None, srcB: torch.Tensor, colsB: torch.Tensor | None,
         eps: torch.Tensor | None, epsc: torch.Tensor | None, gA: torch.Tensor, gB: torch.Tensor,
         ckeep: int = -1, threads: int = 1) -> None:
    """Run the kernel in place on contiguous CPU tensors of one dtype (float32 or float64).

    Shapes as in :data:`SOURCE` (``J`` parts ``(c, H, G, nP, B)``, sources transposed to
    ``(columns, B)``, ``cols`` int32 or None). ``ckeep``: bit g set keeps the cell-state (c)
    row of gate g's entries (LSTM); a clear bit holds it at zero (SnAp's ``jacobian`` pattern
    drops the output gate's). With ``threads > 1`` the units are split between threads.
    """
    name = (f"snap1_step_{'f32' if JA.dtype == torch.float32 else 'f64'}_c{c}"
            + (f"_b{B}" if B in BATCHES else ""))
    fn = getattr(lib, name)
    args = (c, B, H, G, nA, nB, _ptr(JA), _ptr(JB), _ptr(E), _ptr(mA), _ptr(mB), _ptr(udiag),
            _ptr(srcA), _ptr(colsA), _ptr(srcB), _ptr(colsB), _ptr(eps), _ptr(epsc), _ptr(gA), _ptr(gB),
            int(ckeep))
    if threads <= 1:
        fn(*args, 0, H)
        return
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        from concurrent.futures import ThreadPoolExecutor
        _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="snap1"), threads
    bounds = [H * k // threads for k in range(threads + 1)]
    jobs = [_pool.submit(fn, *args, lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    for job in jobs:
        job.result()


def _fn(lib: ctypes.CDLL, name: str, dtype: torch.dtype, batch: int | None = None):
    suffix = f"_b{batch}" if batch in BATCHES else ""
    return getattr(lib, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}{suffix}")


def csr(lib: ctypes.CDLL, values: torch.Tensor, cols: torch.Tensor, srcT: torch.Tensor, out: torch.Tensor) -> None:
    """``out (rows, B) = M srcT`` for ``M`` with ``k`` kept columns a row: ``values`` and int32
    ``cols`` ``(rows * k)``, ``srcT (columns, B)``; contiguous CPU tensors."""
    rows, B = out.shape
    fn = _fn(lib, "snap1_csr", out.dtype, B)
    fn(rows, values.numel() // rows, B, _ptr(values), _ptr(cols), _ptr(srcT), _ptr(out))


def cell(lib: ctypes.CDLL, lstm: bool, act: torch.Tensor, au2: torch.Tensor | None, cn: torch.Tensor | None,
         tcn: torch.Tensor | None, s: torch.Tensor, s_new: torch.Tensor, mA: torch.Tensor, mB: torch.Tensor,
         E: torch.Tensor) -> None:
    """The rest of one cell step and its Jacobian pieces (see :data:`SOURCE`): ``act (B, G, H)``
    contiguous; GRU: ``au2 (B, H)`` with any strides; LSTM: ``cn``, ``tcn (B, H)`` contiguous."""
    B, G, H = act.shape
    sb, su = (0, 0) if au2 is None else au2.stride()
    _fn(lib, "snap1_cell", s.dtype)(int(lstm), B, H, _ptr(act), _ptr(au2), sb, su,
                                    _ptr(cn), _ptr(tcn), _ptr(s), _ptr(s_new), _ptr(mA), _ptr(mB), _ptr(E))
