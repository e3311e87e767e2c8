"""Loading libmoeclient.so.1 and declaring its functions for ctypes."""

import ctypes as C
import ctypes.util
import os

from . import _abi

_lib = None


def _candidates():
    env = os.environ.get("MOECLIENT_LIB")
    if env:
        yield env
    yield _abi.SONAME  # the dynamic linker's search path (installed moed)
    found = ctypes.util.find_library("moeclient")
    if found:
        yield found
    # a build tree next to this package (client/python -> build*/lib)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    for build in ("build", "build-rel", "build-ci/release"):
        yield os.path.join(root, build, "lib", _abi.SONAME)


def lib():
    """The loaded library (loaded once). Set MOECLIENT_LIB to a path to choose one."""
    global _lib
    if _lib is not None:
        return _lib
    errors = []
    for path in _candidates():
        try:
            handle = C.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        _declare(handle)
        _lib = handle
        return handle
    raise OSError(
        "cannot load libmoeclient.so.1 (install moed, or set MOECLIENT_LIB to the "
        "library's path):\n  " + "\n  ".join(errors))


def _declare(h):
    P = C.c_void_p
    I, U32, U64 = C.c_int, C.c_uint32, C.c_uint64
    sigs = {
        "moe_connect_opts": (I, [C.c_char_p, C.POINTER(_abi.ConnectOptions), C.POINTER(P)]),
        "moe_disconnect": (None, [P]),
        "moe_get_model_info": (I, [P, C.POINTER(_abi.ModelInfo)]),
        "moe_forward_ex": (I, [P, C.POINTER(_abi.ForwardArgs)]),
        "moe_buf_alloc": (P, [P, C.c_size_t]),
        "moe_buf_free": (None, [P, P]),
        "moe_submit": (I, [P, U32, I, P, P, U32, U32, C.POINTER(U64)]),
        "moe_poll": (I, [P, C.POINTER(_abi.Completion), I]),
        "moe_wait": (I, [P, U64, I, C.POINTER(I)]),
        "moe_cancel": (I, [P, U64]),
        "moe_ping": (I, [P, C.POINTER(U64)]),
        "moe_status_json": (I, [P, C.POINTER(C.c_void_p), C.POINTER(C.c_size_t)]),
        "moe_metrics_text": (I, [P, C.POINTER(C.c_void_p), C.POINTER(C.c_size_t)]),
        "moe_reconnect": (I, [P]),
        "moe_admin": (I, [P, U32, U32, I, C.c_char_p, C.c_size_t]),
        "moe_epoch_info": (I, [P, U32, C.POINTER(_abi.EpochInfo), C.POINTER(U32), U32]),
        "moe_job": (I, [P, U32, I, C.POINTER(_abi.AdminJob)]),
        "moe_admin_call": (I, [P, C.POINTER(_abi.AdminReq), C.POINTER(_abi.AdminRes)]),
        "moe_trace_start": (I, [P, C.POINTER(_abi.TraceFilter)]),
        "moe_trace_next": (I, [P, C.POINTER(_abi.TraceEvent), I]),
        "moe_trace_stop": (I, [P]),
        "moe_strerror": (C.c_char_p, [I]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(h, name)
        f.restype = res
        f.argtypes = args
