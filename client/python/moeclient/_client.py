"""The Client class: one connection to moed (see the package docstring)."""

import ctypes as C
import json
import os
import threading
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from . import _abi
from ._lib import lib

DTYPE_F32, DTYPE_BF16, DTYPE_F16 = _abi.DTYPE_F32, _abi.DTYPE_BF16, _abi.DTYPE_F16

_ERROR_NAMES = {
    -1: "MOE_EINVAL", -2: "MOE_ENOLAYER", -3: "MOE_E2BIG", -4: "MOE_ERANGE",
    -5: "MOE_ETIMEDOUT", -6: "MOE_ECANCELED", -7: "MOE_ESHUTDOWN", -8: "MOE_EDAEMON",
    -9: "MOE_EPROTO", -10: "MOE_ENOMEM", -11: "MOE_EBUSY", -12: "MOE_EPERM",
    -13: "MOE_EINTERNAL", -14: "MOE_EAGAIN", -15: "MOE_EDTYPE", -16: "MOE_ENOENT",
    -17: "MOE_ELIMIT", -18: "MOE_EDEVICE",
}
_DTYPE_NAMES = {DTYPE_F32: "float32", DTYPE_BF16: "bfloat16", DTYPE_F16: "float16"}
_DTYPE_SIZE = {DTYPE_F32: 4, DTYPE_BF16: 2, DTYPE_F16: 2}


def _abi_op_name(op: int) -> str:
    return {9: "replicate", 10: "unreplicate", 11: "rebalance", 12: "reload",
            13: "version_info"}.get(op, f"admin op {op}")


def error_name(code: int) -> str:
    """The MOE_E* name of a (negative) code, e.g. error_name(-11) == "MOE_EBUSY"."""
    return _ERROR_NAMES.get(code, f"MOE_E({code})")


class MoeError(RuntimeError):
    """A libmoeclient call failed: ``code`` is the MOE_E* code (negative), ``name``
    its symbol, and the message the library's words (plus the daemon's, if any)."""

    def __init__(self, code: int, what: str = "", detail: str = ""):
        self.code = code
        self.name = error_name(code)
        text = lib().moe_strerror(code).decode(errors="replace")
        msg = f"{what}: {self.name}: {text}" if what else f"{self.name}: {text}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def _check(r: int, what: str, detail: str = "") -> int:
    if r < 0:
        raise MoeError(r, what, detail)
    return r


@dataclass(frozen=True)
class ModelInfo:
    """What moed serves (from the handshake)."""
    family: str
    hidden: int
    n_experts: int
    top_k: int
    n_layers: int
    moe_layers: Tuple[int, ...]
    dtype: str  # "float32" | "bfloat16" | "float16": the experts' weights
    max_batch_tokens: int  # per batch; larger requests are split by moed
    max_inflight_requests: int
    max_inflight_tokens: int  # per client; also the largest request
    data_bytes: int


class Routing(NamedTuple):
    """Which experts each token went to (best first) and their weights."""
    ids: np.ndarray  # uint32 [n_tokens, top_k]
    weights: np.ndarray  # float32 [n_tokens, top_k]


class Completion(NamedTuple):
    tag: int
    status: int  # 0 or a MOE_E* code
    epoch: int


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _describe(x):
    """(pointer, dtype code, n_tokens, hidden, kind) of a C-contiguous 2-D array
    or tensor on the CPU."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"tensor on {x.device}: moeclient takes CPU tensors "
                             "(moed moves the data to its GPUs itself)")
        dt = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16,
              torch.float16: DTYPE_F16}.get(x.dtype)
        if dt is None:
            raise TypeError(f"dtype {x.dtype}: moed takes float32, bfloat16 or float16")
        if x.dim() != 2 or not x.is_contiguous():
            raise ValueError("a contiguous [n_tokens, hidden] tensor is expected")
        return x.data_ptr(), dt, x.shape[0], x.shape[1], "torch"
    if isinstance(x, np.ndarray):
        dt = {np.dtype(np.float32): DTYPE_F32, np.dtype(np.float16): DTYPE_F16}.get(x.dtype)
        if dt is None:
            raise TypeError(f"numpy dtype {x.dtype}: moed takes float32 or float16 "
                            "(bfloat16: pass a torch tensor)")
        if x.ndim != 2 or not x.flags["C_CONTIGUOUS"]:
            raise ValueError("a C-contiguous [n_tokens, hidden] array is expected")
        return x.ctypes.data, dt, x.shape[0], x.shape[1], "numpy"
    raise TypeError(f"{type(x).__name__}: a numpy array or a torch tensor is expected")


class _Closing:
    """close() at the end of a `with` block, and when collected."""

    def close(self):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # (interpreter shutdown)
            pass


class Client(_Closing):
    """A connection to moed.

    Client(socket_path=None, *, name=None, region_bytes=0, queue_depth=0,
    connect_timeout=0.0, auto_reconnect=False)

    socket_path None: $MOED_SOCKET, else /run/moed/moed.sock. connect_timeout
    (seconds): while the socket is missing or refuses (moed starting), keep
    trying this long. Thread-safe: calls from several threads overlap as the
    C library allows. Use as a context manager, or call close().
    """

    def __init__(self, socket_path: Optional[str] = None, *, name: Optional[str] = None,
                 region_bytes: int = 0, queue_depth: int = 0, connect_timeout: float = 0.0,
                 auto_reconnect: bool = False):
        L = lib()
        self._lib = L
        self._h = C.c_void_p()
        err = C.create_string_buffer(512)
        self._name = name.encode() if name else None
        o = _abi.ConnectOptions(region_bytes=region_bytes, queue_depth=queue_depth,
                                auto_reconnect=1 if auto_reconnect else 0, name=self._name,
                                errbuf=C.cast(err, C.c_void_p), errbuf_len=len(err),
                                connect_timeout_ms=int(connect_timeout * 1000))
        path = socket_path.encode() if socket_path else None
        _check(L.moe_connect_opts(path, C.byref(o), C.byref(self._h)), "connect",
               err.value.decode(errors="replace"))
        self._local = threading.local()
        self._info = self._read_info()

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Disconnects; buffers from empty() become invalid. Idempotent."""
        if self._h:
            self._lib.moe_disconnect(self._h)
            self._h = C.c_void_p()

    def _handle(self):
        if not self._h:
            raise MoeError(-1, "client", "closed")
        return self._h

    # -- model ------------------------------------------------------------

    def _read_info(self) -> ModelInfo:
        mi = _abi.ModelInfo()
        _check(self._lib.moe_get_model_info(self._handle(), C.byref(mi)), "model_info")
        return ModelInfo(
            family=mi.family.decode(), hidden=mi.hidden, n_experts=mi.n_experts,
            top_k=mi.top_k, n_layers=mi.n_layers,
            moe_layers=tuple(mi.moe_layers[i] for i in range(mi.n_moe_layers)),
            dtype=_DTYPE_NAMES.get(mi.dtype, str(mi.dtype)),
            max_batch_tokens=mi.max_batch_tokens,
            max_inflight_requests=mi.max_inflight_requests,
            max_inflight_tokens=mi.max_inflight_tokens, data_bytes=mi.data_bytes)

    def model_info(self) -> ModelInfo:
        """The model moed serves (as of the last handshake)."""
        return self._info

    # -- forward ----------------------------------------------------------

    def _args(self):
        a = getattr(self._local, "args", None)
        if a is None:
            a = self._local.args = _abi.ForwardArgs(size=C.sizeof(_abi.ForwardArgs))
            self._local.epoch = C.c_uint32()
            a.epoch = C.pointer(self._local.epoch)
        return a

    def forward(self, layer: int, x, out=None, *, routing: bool = False, timeout_ms: int = 0,
                return_epoch: bool = False):
        """Runs MoE layer `layer` (its index among the decoder layers) on x
        [n_tokens, hidden] and returns the output, same shape and dtype
        (written into `out` if given). With routing=True also returns a
        Routing (expert ids and weights per token); with return_epoch=True
        also the id of the epoch (weights version) it ran on. Requests above
        max_batch_tokens are split by moed, with the same result."""
        ptr, dt, n, h, kind = _describe(x)
        if h != self._info.hidden:
            raise ValueError(f"hidden size {h}, the model's is {self._info.hidden}")
        if out is None:
            if kind == "torch":
                out = x.new_empty(x.shape)
            else:
                out = np.empty_like(x)
        optr, odt, on, oh, _ = _describe(out)
        if (odt, on, oh) != (dt, n, h):
            raise ValueError("out must have x's shape and dtype")
        a = self._args()
        a.flags = _abi.FWD_ROUTING if routing else 0
        a.layer, a.dtype, a.inp, a.out = layer, dt, ptr, optr
        a.n_tokens, a.timeout_ms = n, timeout_ms
        ids = w = None
        if routing:
            k = self._info.top_k
            ids = np.empty((n, k), np.uint32)
            w = np.empty((n, k), np.float32)
            a.topk_ids, a.topk_weights = ids.ctypes.data, w.ctypes.data
        else:
            a.topk_ids = a.topk_weights = None
        r = self._lib.moe_forward_ex(self._handle(), C.byref(a))
        if r:
            raise MoeError(r, f"forward(layer {layer}, {n} tokens)")
        res = [out]
        if routing:
            res.append(Routing(ids, w))
        if return_epoch:
            res.append(self._local.epoch.value)
        return res[0] if len(res) == 1 else tuple(res)

    # -- zero-copy buffers and async requests -----------------------------

    def empty(self, n_tokens: int, dtype: str = "float32"):
        """A [n_tokens, hidden] array inside the shared region (zero-copy for
        submit()). float32/float16: a numpy array; bfloat16: a torch tensor.
        Valid until free_buffer() or close()."""
        dt = {"float32": DTYPE_F32, "bfloat16": DTYPE_BF16, "float16": DTYPE_F16}[dtype]
        nbytes = n_tokens * self._info.hidden * _DTYPE_SIZE[dt]
        p = self._lib.moe_buf_alloc(self._handle(), nbytes)
        if not p:
            raise MoeError(-10, "empty", f"no free span of {nbytes} bytes in the shared region")
        raw = (C.c_uint8 * nbytes).from_address(p)
        if dt == DTYPE_BF16:
            torch = _torch()
            if torch is None:
                self._lib.moe_buf_free(self._handle(), p)
                raise TypeError("bfloat16 buffers are torch tensors: install torch")
            return torch.frombuffer(raw, dtype=torch.bfloat16).view(n_tokens,
                                                                    self._info.hidden)
        np_dt = np.float32 if dt == DTYPE_F32 else np.float16
        return np.frombuffer(raw, dtype=np_dt).reshape(n_tokens, self._info.hidden)

    def free_buffer(self, buf) -> None:
        """Returns a buffer from empty() to the shared region."""
        ptr = _describe(buf)[0]
        self._lib.moe_buf_free(self._handle(), ptr)

    def submit(self, layer: int, x, out, *, timeout_ms: int = 0) -> int:
        """Queues a request on buffers from empty() (in place: out may be x)
        and returns its tag at once; collect it with wait() or poll(). Do not
        touch x or out until it completes."""
        ptr, dt, n, h, _ = _describe(x)
        optr, odt, on, oh, _ = _describe(out)
        if (odt, on, oh) != (dt, n, h):
            raise ValueError("out must have x's shape and dtype")
        tag = C.c_uint64()
        _check(self._lib.moe_submit(self._handle(), layer, dt, ptr, optr, n, timeout_ms,
                                    C.byref(tag)), f"submit(layer {layer}, {n} tokens)")
        return tag.value

    def wait(self, tag: int, timeout_ms: int = -1) -> None:
        """Waits for request `tag`; raises MoeError with its status if it
        failed, MOE_ETIMEDOUT if still running after timeout_ms (>= 0)."""
        st = C.c_int()
        _check(self._lib.moe_wait(self._handle(), tag, timeout_ms, C.byref(st)),
               f"wait(tag {tag})")
        if st.value:
            raise MoeError(st.value, f"request {tag}")

    def poll(self, max_completions: int = 64) -> List[Completion]:
        """Finished requests no thread waits for (never blocks)."""
        arr = (_abi.Completion * max_completions)()
        n = _check(self._lib.moe_poll(self._handle(), arr, max_completions), "poll")
        return [Completion(arr[i].tag, arr[i].status, arr[i].epoch) for i in range(n)]

    def cancel(self, tag: int) -> None:
        """Cancels a queued request (it completes with MOE_ECANCELED)."""
        _check(self._lib.moe_cancel(self._handle(), tag), f"cancel(tag {tag})")

    # -- control ----------------------------------------------------------

    def ping(self) -> float:
        """A no-op through both rings; returns the round trip in seconds."""
        ns = C.c_uint64()
        _check(self._lib.moe_ping(self._handle(), C.byref(ns)), "ping")
        return ns.value / 1e9

    def status(self) -> dict:
        """moed's status (what `moectl status --json` prints), parsed."""
        p, n = C.c_void_p(), C.c_size_t()
        _check(self._lib.moe_status_json(self._handle(), C.byref(p), C.byref(n)), "status")
        try:
            return json.loads(C.string_at(p, n.value).decode())
        finally:
            C.CDLL(None).free(p)

    def metrics(self) -> str:
        """moed's metrics, Prometheus text format (what `moectl metrics`
        prints and the HTTP endpoint serves; docs/metrics.md)."""
        p, n = C.c_void_p(), C.c_size_t()
        _check(self._lib.moe_metrics_text(self._handle(), C.byref(p), C.byref(n)), "metrics")
        try:
            return C.string_at(p, n.value).decode()
        finally:
            C.CDLL(None).free(p)

    def trace(self, count: int = 0, layer: Optional[int] = None, pid: Optional[int] = None,
              timeout: Optional[float] = None):
        """Per-request trace records (what `moectl trace` prints), as dicts,
        from now on: every request that runs on `layer` (decoder-layer index;
        None: any) from process `pid` (None: any client), `count` of them
        (0: until the caller stops iterating). Operators only. A record:
        seq, unix_ns, pid, client, name, tag, layer, tokens, dtype, status,
        epoch, weights_version, batch_requests, batch_tokens, experts
        ({expert: tokens routed to it}), latency_ns, stages_ns ({stage: ns}:
        the request's queue wait, then its batch's stages), lost (records
        this tracer has lost so far: it read too slowly). Stops with
        MoeError(MOE_ETIMEDOUT) after `timeout` seconds without a record.
        Use a Client of its own: the session is a tracer until the returned
        TraceStream is closed (close(), a `with` block, or its end), or the
        Client is."""
        f = _abi.TraceFilter(layer=_abi.ADMIN_ALL_LAYERS if layer is None else layer,
                             pid=pid or 0, count=count)
        # (started here, not at the first next(): requests from now on)
        _check(self._lib.moe_trace_start(self._handle(), C.byref(f)), "trace")
        return TraceStream(self, count, -1 if timeout is None else int(timeout * 1000))

    def epoch_info(self, epoch: int) -> dict:
        """What an epoch id (from forward(return_epoch=True)) means."""
        info = _abi.EpochInfo()
        cap = max(len(self._info.moe_layers), 1)
        vers = (C.c_uint32 * cap)()
        _check(self._lib.moe_epoch_info(self._handle(), epoch, C.byref(info), vers, cap),
               f"epoch_info({epoch})")
        return {"id": info.id, "flags": info.flags, "placement_gen": info.placement_gen,
                "weights_versions": [vers[i] for i in range(min(info.n_layers, cap))]}

    def job(self, job: int, cancel: bool = False) -> dict:
        """An admin job's progress (or, cancel=True, its cancellation): id,
        op, state (1 running, 2 done, 3 cancelled, 4 failed), result,
        done/total steps and its message."""
        j = _abi.AdminJob()
        _check(self._lib.moe_job(self._handle(), job, 1 if cancel else 0, C.byref(j)),
               f"job({job})")
        return {"job": j.job, "op": j.op, "state": j.state, "result": j.result,
                "done": j.done, "total": j.total, "message": j.message.decode(errors="replace")}

    def _admin(self, op: int, flags: int = 0, timeout_ms: int = -1) -> str:
        msg = C.create_string_buffer(256)
        _check(self._lib.moe_admin(self._handle(), op, flags, timeout_ms, msg, len(msg)),
               "admin", "")
        return msg.value.decode(errors="replace")

    def drain(self, wait: bool = False, timeout_ms: int = -1) -> str:
        """Refuses new requests; queued ones finish (wait: answer once none is
        queued). Needs the admin privilege. Returns moed's words."""
        return self._admin(1, 1 if wait else 0, timeout_ms)

    def undrain(self) -> str:
        """Accepts requests again (admin)."""
        return self._admin(2)

    def reload_config(self) -> str:
        """Re-reads moed's configuration file (admin)."""
        return self._admin(3)

    # ---- where experts live (CPU ranks; the admin privilege) ----------------

    def _admin_call(self, op: int, payload, flags: int = 0, wait: bool = False,
                    timeout_ms: int = -1):
        res = _abi.AdminRes()
        req = _abi.AdminReq(op, flags, C.cast(C.byref(payload), C.c_void_p), C.sizeof(payload),
                            timeout_ms, 1 if wait else 0)
        r = self._lib.moe_admin_call(self._handle(), C.byref(req), C.byref(res))
        _check(r, _abi_op_name(op), res.message.decode(errors="replace"))
        return res

    @staticmethod
    def _job_dict(j) -> dict:
        return {"job": j.job, "op": j.op, "state": j.state, "result": j.result,
                "done": j.done, "total": j.total, "message": j.message.decode(errors="replace")}

    def replicate(self, layer: int, expert: int, rank: int, wait: bool = False) -> dict:
        """One more replica of `expert` of decoder layer `layer` on `rank`:
        a job that copies its weights off the serving path and publishes the
        placement. Returns {"message", "job": {...}} (the job as it ended
        with wait=True). Refusals (unknown layer/expert/rank, no free slot,
        a change running) raise MoeError with moed's reason."""
        res = self._admin_call(_abi.ADMIN_REPLICATE, _abi.AdminReplica(layer, expert, rank, 0),
                               wait=wait)
        return {"message": res.message.decode(errors="replace"), "job": self._job_dict(res.job)}

    def unreplicate(self, layer: int, expert: int, rank: int, wait: bool = False) -> dict:
        """Drops that replica (never an expert's last one); as replicate()."""
        res = self._admin_call(_abi.ADMIN_UNREPLICATE,
                               _abi.AdminReplica(layer, expert, rank, 0), wait=wait)
        return {"message": res.message.decode(errors="replace"), "job": self._job_dict(res.job)}

    def rebalance(self, layer: Optional[int] = None, full: bool = False, dry_run: bool = False,
                  wait: bool = False) -> dict:
        """Plans from the load window (all layers, or one) and, unless
        dry_run, moves there as a job. Returns {"message"} plus "plan"
        (dry run, or nothing to change: layers, layers_changed, added,
        dropped, moved, copy_bytes, before, after) or "job"."""
        p = _abi.AdminRebalance(_abi.ADMIN_ALL_LAYERS if layer is None else layer,
                                1 if full else 0)
        res = self._admin_call(_abi.ADMIN_REBALANCE, p, _abi.ADMIN_DRY_RUN if dry_run else 0,
                               wait=wait)
        out = {"message": res.message.decode(errors="replace")}
        if res.result_len == C.sizeof(_abi.AdminPlan):
            plan = _abi.AdminPlan.from_buffer_copy(bytes(res.result[:res.result_len]))
            out["plan"] = {f: getattr(plan, f) for f, _ in _abi.AdminPlan._fields_
                           if f != "reserved"}
        else:
            out["job"] = self._job_dict(res.job)
        return out

    # ---- weights versions (reload: the admin privilege) ---------------------

    def reload(self, model: Optional[str] = None, layers=None, experts=None,
               atomic: bool = False, max_parallel: int = 0, wait: bool = False) -> dict:
        """New expert weights while serving (moectl reload): from `model`
        (a checkpoint of the same architecture; None: moed's model.path read
        again), the decoder `layers` given (None: all), only `experts` of
        each (routers must be unchanged), or everything in one epoch
        (atomic). A job: returns {"message", "job"} (as it ended with
        wait=True; a failed job's reason is in job["message"])."""
        p = _abi.AdminReload()
        p.max_parallel = max_parallel
        if atomic:
            p.flags |= _abi.RELOAD_ATOMIC
        if model is not None:
            path = os.path.abspath(model).encode()
            if len(path) >= 1024:  # (char model[1024], NUL-terminated)
                raise ValueError("model path too long")
            p.model = path
        for bits, items, limit in ((p.layers, layers, 256), (p.experts, experts, 1024)):
            for i in items or ():
                if not 0 <= i < limit:
                    raise ValueError(f"{i}: out of range")
                bits[i // 64] |= 1 << (i % 64)
        res = self._admin_call(_abi.ADMIN_RELOAD, p, wait=wait)
        return {"message": res.message.decode(errors="replace"), "job": self._job_dict(res.job)}

    def rollback(self, wait: bool = False) -> dict:
        """Back to the weights the last reload replaced (kept by moed while
        reload.keep_previous is on); as reload()."""
        p = _abi.AdminReload()
        p.flags = _abi.RELOAD_ROLLBACK
        res = self._admin_call(_abi.ADMIN_RELOAD, p, wait=wait)
        return {"message": res.message.decode(errors="replace"), "job": self._job_dict(res.job)}

    def version_info(self, layer: int, version: int = 0) -> dict:
        """What weights version `version` of decoder layer `layer` is (0: the
        current one): router_version, router_source, rollback, and each
        expert's version and source (source ids: status()["weights"]
        ["sources"]). With epoch_info() it tells which weights a request
        ran on. Any client may ask."""
        out = {"layer": layer, "expert_versions": [], "expert_sources": []}
        first = 0
        while True:
            res = self._admin_call(_abi.ADMIN_VERSION_INFO,
                                   _abi.AdminVersionRef(layer, version, first, 0))
            raw = bytes(res.result[:res.result_len])
            v = _abi.AdminVersion.from_buffer_copy(raw)
            n, base = v.n_experts, C.sizeof(_abi.AdminVersion)
            words = np.frombuffer(raw[base:base + 8 * n], dtype=np.uint32)
            out["expert_versions"] += words[:n].tolist()
            out["expert_sources"] += words[n:2 * n].tolist()
            out.update(version=v.version, router_version=v.router_version,
                       router_source=v.router_source, rollback=bool(v.flags & 1))
            first += n
            if not n or first >= v.total_experts:
                return out

    def reconnect(self) -> None:
        """After MOE_EDAEMON: connects again (buffers keep their contents)."""
        _check(self._lib.moe_reconnect(self._handle()), "reconnect")
        self._info = self._read_info()


class TraceStream(_Closing):
    """The records of Client.trace(), one dict per next(); close() (or the
    end of a `with` block, or of `count` records) detaches the tracer."""

    def __init__(self, client: "Client", count: int, ms: int):
        self._c, self._count, self._ms = client, count, ms
        self._ev = _abi.TraceEvent()
        self._open = True

    def __iter__(self):
        return self

    def close(self):
        if self._open:
            self._open = False
            if self._c._h:
                self._c._lib.moe_trace_stop(self._c._h)

    def __next__(self) -> dict:
        if not self._open:
            raise StopIteration
        ev = self._ev
        r = self._c._lib.moe_trace_next(self._c._handle(), C.byref(ev), self._ms)
        if r == -16 and self._count:  # MOE_ENOENT: `count` records returned
            self.close()
            raise StopIteration
        if r < 0:
            self.close()
            _check(r, "trace")
        rec = ev.rec
        return {
            "seq": rec.seq, "unix_ns": rec.unix_ns, "pid": rec.pid, "client": rec.client,
            "name": rec.client_name.decode(errors="replace"), "tag": rec.tag,
            "layer": rec.layer, "tokens": rec.tokens,
            "dtype": ("float32", "bfloat16", "float16")[rec.dtype] if rec.dtype < 3 else "?",
            "status": rec.status, "epoch": rec.epoch, "weights_version": rec.weights_version,
            "batch_requests": rec.batch_requests, "batch_tokens": rec.batch_tokens,
            "experts": {ev.hits[i].expert: ev.hits[i].tokens
                        for i in range(min(rec.n_hits, _abi.TRACE_MAX_HITS))},
            "latency_ns": rec.latency_ns,
            "stages_ns": dict(zip(_abi.TRACE_STAGES, rec.stage_ns)),
            "lost": ev.lost,
        }
