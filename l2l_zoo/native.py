"""Native (C) kernels, compiled at first use with the machine's C compiler and loaded with ctypes.

Only kernels whose torch formulation is memory-bound and makes many passes over the same data live
here (today: SimpleOptimizer's cell, ``optimizers/simple_cell.c``, and one layer of DMOptimizer's and
RNNProp's coordinate-wise LSTM, ``optimizers/lstm_cell.c``). Each has a torch fallback that
is also its reference, and nothing depends on a kernel being present: without a C compiler, with
``L2L_ZOO_NATIVE=0``, or when compilation fails (reported once as a warning), the torch code runs.

The shared library is built from the shipped source into ``$L2L_ZOO_CACHE/native`` (default
``~/.cache/l2l_zoo/native``, created private to the user) under a name that hashes the source, the
compiler, its flags and the CPU capability, so a changed source or another machine's cache never
loads a stale build. It is compiled under a per-process temporary name and renamed into place, so
concurrent first uses cannot leave a half-written library. A folder or library that another user owns
or that others can write to is refused (loading a library runs its code). ``-fopenmp`` links the libgomp that
torch itself loads, so the kernels run on torch's thread count (``torch.get_num_threads()``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["simple_cell", "lstm_cell", "enabled", "cache_dir", "COUNTS", "SUFFIX", "functorch_wrapped", "ptr",
           "plain_cpu"]

_SRC = Path(__file__).parent / "optimizers" / "simple_cell.c"
_LSTM_SRC = Path(__file__).parent / "optimizers" / "lstm_cell.c"
#: headers the sources include: hashed into every library's name, so a change rebuilds them
_HEADERS = (Path(__file__).parent / "optimizers" / "native_math.h",)
_LOCK = threading.Lock()
_LIBS: dict = {}


def enabled() -> bool:
    """False when ``L2L_ZOO_NATIVE=0`` (the torch fallback then always runs)."""
    return os.environ.get("L2L_ZOO_NATIVE", "1").strip() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("L2L_ZOO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "l2l_zoo")
    return Path(root) / "native"


def _cpu_capability() -> str:
    """torch's CPU capability (e.g. "AVX2"): the instruction set the kernels may use."""
    return torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"


def _flags(openmp: bool = True) -> list:
    flags = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
    # without the OpenMP runtime its simd pragmas still apply (-fopenmp-simd): the same vectorised
    # reductions, so the serial build gives the same bits as the threaded one
    flags.append("-fopenmp" if openmp else "-fopenmp-simd")
    if _cpu_capability() in ("AVX2", "AVX512"):  # what torch's own kernels use on this CPU; nothing newer
        flags += ["-mavx2", "-mfma"]
    return flags


def _build(src: Path):
    """Compile (or find in the cache) and load ``src``: with OpenMP, else (a compiler without it,
    e.g. Apple clang) single-threaded; raises RuntimeError with the first failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or L2L_ZOO_NATIVE=0 to silence this)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C compiler {cc!r} does not run: {e}") from None
    errors = []
    for openmp in (True, False):
        try:
            return ctypes.CDLL(str(_compile(src, cc, version, _flags(openmp))))
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
    raise RuntimeError(errors[0] + " (and without -fopenmp: " + errors[1][-200:] + ")")


def _compile(src: Path, cc: str, version: str, flags: list) -> Path:
    key = hashlib.sha256(b"".join(f.read_bytes() for f in (src, *_HEADERS))
                         + "\0".join([cc, version, *flags, _cpu_capability()]).encode())
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(d)
    lib = d / f"{src.stem}-{key.hexdigest()[:20]}.so"
    if lib.exists():
        _check_private(lib)
        return lib
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.{os.getpid()}.", suffix=".so", dir=d)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(src), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {src.name}: {(r.stderr or r.stdout).strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _check_private(path: Path) -> None:
    """Loading a shared library runs its code: refuse a cache folder or library that another user
    owns or that others can write to (someone could have planted it)."""
    if not hasattr(os, "getuid"):
        return
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is not private to this user (owner uid {st.st_uid}, mode "
                           f"{oct(st.st_mode & 0o777)}): not loading code from it; fix it or set L2L_ZOO_CACHE")


def _load(src: Path):
    """The library built from ``src``, or None (fallback) if native kernels are off or cannot be
    built; a build failure is reported once per process (the first source that fails)."""
    if not enabled():
        return None
    with _LOCK:
        if src not in _LIBS:
            try:
                _LIBS[src] = _build(src)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                if not any(v is None for v in _LIBS.values()):  # one warning per process, not per source
                    warnings.warn(f"l2l_zoo: native kernels unavailable, using the torch code instead ({e})",
                                  RuntimeWarning, stacklevel=3)
                _LIBS[src] = None
        return _LIBS[src]


_I64, _INT, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p

#: what the native kernel calls did, for benchmarks (torch's FLOP and byte counters cannot see inside
#: them): tensor bytes read + written, and the FLOPs of the matrix products they replace.
#: ``benchmarks/metatrain_speed.py`` adds the difference over a counted truncation.
COUNTS = {"bytes": 0, "flops": 0}

#: the kernels' function-name suffix per dtype (the dtypes they are built for)
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def ptr(t) -> int | None:
    """A tensor's data pointer for a kernel argument; None (NULL) for an absent tensor."""
    return None if t is None else t.data_ptr()


def plain_cpu(*ts) -> bool:
    """Whether tensors suit the kernels: on the CPU, all of the first one's dtype, and that dtype one
    they are built for (``SUFFIX``); None entries (absent tensors) are skipped."""
    t0 = ts[0]
    return t0.dtype in SUFFIX and all(t is None or (t.device.type == "cpu" and t.dtype == t0.dtype) for t in ts)


def functorch_wrapped(*ts) -> bool:
    """True for tensors inside ``torch.func`` transforms (vmap, grad), where a kernel's autograd
    Function does not run: callers use their torch formulas instead."""
    is_b = getattr(torch._C._functorch, "is_batchedtensor", None)
    is_f = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return any(t is not None and ((is_b is not None and is_b(t)) or (is_f is not None and is_f(t))) for t in ts)


def simple_cell():
    """SimpleOptimizer's cell kernels as a ctypes library with argument types set, or None."""
    lib = _load(_SRC)
    if lib is not None and not getattr(lib, "_typed", False):
        for t in ("f32", "f64"):
            f = getattr(lib, f"simple_cell_forward_{t}")
            f.argtypes = [_I64, _I64, _I64] + [_P] * 10 + [_INT]
            f.restype = None
            b = getattr(lib, f"simple_cell_backward_{t}")
            b.argtypes = [_I64, _I64, _I64] + [_P] * 11 + [_INT] + [_P] * 4 + [_INT]
            b.restype = None
        lib.simple_cell_tanh_f32.argtypes = [_I64, _P, _P]
        lib.simple_cell_tanh_f32.restype = None
        for f in (lib.simple_cell_forward_scratch, lib.simple_cell_backward_scratch):
            f.argtypes, f.restype = [_I64] * 3, _I64
        lib._typed = True
    return lib


def lstm_cell():
    """The coordinate-wise LSTM layer kernels as a ctypes library with argument types set, or None."""
    lib = _load(_LSTM_SRC)
    if lib is not None and not getattr(lib, "_typed", False):
        for t in ("f32", "f64"):
            f = getattr(lib, f"lstm_forward_{t}")
            f.argtypes = [_I64] * 3 + [_P, _INT] * 3 + [_P] * 4 + [_INT]
            f.restype = None
            b = getattr(lib, f"lstm_backward_{t}")
            b.argtypes = [_I64] * 3 + [_P, _INT] * 3 + [_P] * 2 + [_P, _INT] * 2 + [_P] * 3 + [_INT] + [_P] * 3 + [_INT]
            b.restype = None
        lib.lstm_sigmoid_f32.argtypes = [_I64, _P, _P]
        lib.lstm_sigmoid_f32.restype = None
        lib.lstm_backward_scratch.argtypes, lib.lstm_backward_scratch.restype = [_I64] * 3, _I64
        lib._typed = True
    return lib
