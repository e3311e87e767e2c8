"""ctypes mirrors of libmoeclient.so.1's public structs (client/include/moeclient.h).

tests/test_abi.c pins the C layouts; tests/test_binding.py checks these
mirrors against the same numbers, so the two cannot drift apart silently.
"""

import ctypes as C

SONAME = "libmoeclient.so.1"

DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
FWD_ROUTING = 0x1


class ModelInfo(C.Structure):
    _fields_ = [
        ("family", C.c_char * 16),
        ("hidden", C.c_uint32),
        ("n_experts", C.c_uint32),
        ("top_k", C.c_uint32),
        ("n_layers", C.c_uint32),
        ("n_moe_layers", C.c_uint32),
        ("moe_layers", C.c_uint16 * 512),
        ("dtype", C.c_uint32),
        ("max_batch_tokens", C.c_uint32),
        ("max_inflight_requests", C.c_uint32),
        ("max_inflight_tokens", C.c_uint32),
        ("data_bytes", C.c_uint64),
    ]


class ConnectOptions(C.Structure):
    _fields_ = [
        ("region_bytes", C.c_uint64),
        ("queue_depth", C.c_uint32),
        ("auto_reconnect", C.c_uint32),
        ("name", C.c_char_p),
        ("errbuf", C.c_void_p),
        ("errbuf_len", C.c_uint64),
        ("connect_timeout_ms", C.c_uint32),
        ("reserved", C.c_uint32 * 7),
    ]


class ForwardArgs(C.Structure):
    _fields_ = [
        ("size", C.c_uint32),
        ("flags", C.c_uint32),
        ("layer", C.c_uint32),
        ("dtype", C.c_uint32),
        ("inp", C.c_void_p),
        ("out", C.c_void_p),
        ("n_tokens", C.c_uint32),
        ("timeout_ms", C.c_uint32),
        ("topk_ids", C.c_void_p),
        ("topk_weights", C.c_void_p),
        ("epoch", C.POINTER(C.c_uint32)),
    ]


class Completion(C.Structure):
    _fields_ = [("tag", C.c_uint64), ("status", C.c_int32), ("epoch", C.c_uint32)]


class AdminJob(C.Structure):
    _fields_ = [
        ("job", C.c_uint32),
        ("op", C.c_uint32),
        ("state", C.c_uint32),
        ("result", C.c_int32),
        ("done", C.c_uint64),
        ("total", C.c_uint64),
        ("message", C.c_char * 128),
    ]


class EpochInfo(C.Structure):
    _fields_ = [
        ("id", C.c_uint32),
        ("flags", C.c_uint32),
        ("placement_gen", C.c_uint64),
        ("n_layers", C.c_uint32),
        ("reserved", C.c_uint32),
    ]


class AdminReq(C.Structure):
    _fields_ = [
        ("op", C.c_uint32),
        ("flags", C.c_uint32),
        ("payload", C.c_void_p),
        ("payload_len", C.c_uint32),
        ("timeout_ms", C.c_int32),
        ("wait_job", C.c_uint32),
    ]


class AdminRes(C.Structure):
    _fields_ = [
        ("status", C.c_int32),
        ("message", C.c_char * 244),
        ("result_len", C.c_uint32),
        ("result", C.c_ubyte * 3832),
        ("job", AdminJob),
    ]


class AdminReplica(C.Structure):
    _fields_ = [("layer", C.c_uint32), ("expert", C.c_uint32), ("rank", C.c_uint32),
                ("reserved", C.c_uint32)]


class AdminRebalance(C.Structure):
    _fields_ = [("layer", C.c_uint32), ("mode", C.c_uint32)]


class AdminPlan(C.Structure):
    _fields_ = [
        ("layers", C.c_uint32),
        ("layers_changed", C.c_uint32),
        ("added", C.c_uint32),
        ("dropped", C.c_uint32),
        ("moved", C.c_uint32),
        ("reserved", C.c_uint32),
        ("copy_bytes", C.c_uint64),
        ("before", C.c_double),
        ("after", C.c_double),
    ]


class AdminReload(C.Structure):
    _fields_ = [
        ("flags", C.c_uint32),
        ("max_parallel", C.c_uint32),
        ("layers", C.c_uint64 * 4),
        ("experts", C.c_uint64 * 16),
        ("model", C.c_char * 1024),
    ]


class AdminVersionRef(C.Structure):
    _fields_ = [("layer", C.c_uint32), ("version", C.c_uint32), ("first_expert", C.c_uint32),
                ("reserved", C.c_uint32)]


class AdminVersion(C.Structure):
    _fields_ = [
        ("layer", C.c_uint32),
        ("version", C.c_uint32),
        ("router_version", C.c_uint32),
        ("router_source", C.c_uint32),
        ("flags", C.c_uint32),
        ("total_experts", C.c_uint32),
        ("first_expert", C.c_uint32),
        ("n_experts", C.c_uint32),
    ]


class TraceFilter(C.Structure):
    _fields_ = [("layer", C.c_uint32), ("pid", C.c_int32), ("count", C.c_uint64),
                ("flags", C.c_uint32), ("reserved", C.c_uint32)]


TRACE_STAGES = ("queue", "convert", "router", "dispatch", "exchange", "experts", "combine",
                "device")
TRACE_MAX_HITS = 480


class TraceRecord(C.Structure):
    _fields_ = [
        ("seq", C.c_uint64),
        ("tag", C.c_uint64),
        ("unix_ns", C.c_uint64),
        ("latency_ns", C.c_uint64),
        ("stage_ns", C.c_uint64 * len(TRACE_STAGES)),
        ("pid", C.c_int32),
        ("client", C.c_uint32),
        ("client_name", C.c_char * 32),
        ("layer", C.c_uint32),
        ("tokens", C.c_uint32),
        ("dtype", C.c_uint32),
        ("status", C.c_int32),
        ("epoch", C.c_uint32),
        ("weights_version", C.c_uint32),
        ("batch_requests", C.c_uint32),
        ("batch_tokens", C.c_uint32),
        ("n_hits", C.c_uint32),
        ("flags", C.c_uint32),
    ]


class TraceHit(C.Structure):
    _fields_ = [("expert", C.c_uint32), ("tokens", C.c_uint32)]


class TraceEvent(C.Structure):
    _fields_ = [("rec", TraceRecord), ("hits", TraceHit * TRACE_MAX_HITS), ("lost", C.c_uint64)]


ADMIN_REPLICATE, ADMIN_UNREPLICATE, ADMIN_REBALANCE = 9, 10, 11
ADMIN_RELOAD, ADMIN_VERSION_INFO = 12, 13
RELOAD_ATOMIC, RELOAD_ROLLBACK, RELOAD_CANCEL = 0x1, 0x2, 0x4
ADMIN_DRY_RUN = 0x2
ADMIN_ALL_LAYERS = 0xFFFFFFFF

# (name, offset, size) per field, as tests/test_abi.c asserts them in C
LAYOUT = {
    ModelInfo: ([("family", 0, 16), ("hidden", 16, 4), ("moe_layers", 36, 1024),
                 ("dtype", 1060, 4), ("max_batch_tokens", 1064, 4),
                 ("max_inflight_tokens", 1072, 4), ("data_bytes", 1080, 8)], 1088),
    ConnectOptions: ([("region_bytes", 0, 8), ("queue_depth", 8, 4), ("auto_reconnect", 12, 4),
                      ("name", 16, 8), ("errbuf", 24, 8), ("errbuf_len", 32, 8),
                      ("connect_timeout_ms", 40, 4), ("reserved", 44, 28)], 72),
    ForwardArgs: ([("size", 0, 4), ("flags", 4, 4), ("layer", 8, 4), ("dtype", 12, 4),
                   ("inp", 16, 8), ("out", 24, 8), ("n_tokens", 32, 4), ("timeout_ms", 36, 4),
                   ("topk_ids", 40, 8), ("topk_weights", 48, 8), ("epoch", 56, 8)], 64),
    Completion: ([("tag", 0, 8), ("status", 8, 4), ("epoch", 12, 4)], 16),
    AdminJob: ([("job", 0, 4), ("result", 12, 4), ("done", 16, 8), ("message", 32, 128)], 160),
    EpochInfo: ([("id", 0, 4), ("placement_gen", 8, 8), ("n_layers", 16, 4)], 24),
    AdminReq: ([("op", 0, 4), ("flags", 4, 4), ("payload", 8, 8), ("payload_len", 16, 4),
                ("timeout_ms", 20, 4), ("wait_job", 24, 4)], 32),
    AdminRes: ([("status", 0, 4), ("message", 4, 244), ("result_len", 248, 4),
                ("result", 252, 3832), ("job", 4088, 160)], 4248),
    AdminReplica: ([("layer", 0, 4), ("expert", 4, 4), ("rank", 8, 4), ("reserved", 12, 4)], 16),
    AdminRebalance: ([("layer", 0, 4), ("mode", 4, 4)], 8),
    AdminPlan: ([("layers", 0, 4), ("layers_changed", 4, 4), ("added", 8, 4), ("dropped", 12, 4),
                 ("moved", 16, 4), ("copy_bytes", 24, 8), ("before", 32, 8), ("after", 40, 8)],
                48),
    AdminReload: ([("flags", 0, 4), ("max_parallel", 4, 4), ("layers", 8, 32),
                   ("experts", 40, 128), ("model", 168, 1024)], 1192),
    AdminVersionRef: ([("layer", 0, 4), ("version", 4, 4), ("first_expert", 8, 4)], 16),
    AdminVersion: ([("layer", 0, 4), ("version", 4, 4), ("router_version", 8, 4),
                    ("router_source", 12, 4), ("flags", 16, 4), ("total_experts", 20, 4),
                    ("first_expert", 24, 4), ("n_experts", 28, 4)], 32),
    TraceFilter: ([("layer", 0, 4), ("pid", 4, 4), ("count", 8, 8), ("flags", 16, 4)], 24),
    TraceRecord: ([("seq", 0, 8), ("tag", 8, 8), ("unix_ns", 16, 8), ("latency_ns", 24, 8),
                   ("stage_ns", 32, 64), ("pid", 96, 4), ("client", 100, 4),
                   ("client_name", 104, 32), ("layer", 136, 4), ("tokens", 140, 4),
                   ("dtype", 144, 4), ("status", 148, 4), ("epoch", 152, 4),
                   ("weights_version", 156, 4), ("batch_requests", 160, 4),
                   ("batch_tokens", 164, 4), ("n_hits", 168, 4), ("flags", 172, 4)], 176),
    TraceHit: ([("expert", 0, 4), ("tokens", 4, 4)], 8),
}
