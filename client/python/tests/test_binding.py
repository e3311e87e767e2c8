"""moeclient against a real moed on the committed fixtures (numpy only).

Run: MOED_BIN_DIR=build-rel/bin python -m unittest discover client/python/tests
"""

import ctypes as C
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moedtest  # noqa: E402  (sets MOECLIENT_LIB)
import moeclient  # noqa: E402
from moeclient import _abi  # noqa: E402

OLMOE = os.path.join(moedtest.FIXTURES, "olmoe_f32")


def read_safetensors(path):
    """{name: array} for F32/F64/I32 tensors (a reader of our own: numpy only)."""
    kinds = {"F32": np.float32, "F64": np.float64, "I32": np.int32}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in head.items():
        if name == "__metadata__" or t["dtype"] not in kinds:
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], kinds[t["dtype"]]).reshape(t["shape"])
    return out


REF = read_safetensors(os.path.join(OLMOE, "reference.safetensors"))
LAYERS = sorted({int(k.split(".")[1]) for k in REF})


def rel_err(got, want):
    rms = np.sqrt((want.astype(np.float64) ** 2).mean(axis=-1, keepdims=True))
    return (np.abs(got.astype(np.float64) - want) / rms).max()


class Binding(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.moed = moedtest.Moed(OLMOE).wait_ready()
        cls.c = moeclient.Client(cls.moed.sock, name="pytest")

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        assert cls.moed.stop() == 0

    def test_abi_layout(self):
        for cls, (fields, size) in _abi.LAYOUT.items():
            self.assertEqual(C.sizeof(cls), size, cls.__name__)
            for name, off, sz in fields:
                self.assertEqual(getattr(cls, name).offset, off, f"{cls.__name__}.{name}")
                self.assertEqual(getattr(cls, name).size, sz, f"{cls.__name__}.{name}")

    def test_model_info(self):
        info = self.c.model_info()
        self.assertEqual(info.family, "olmoe")
        self.assertEqual(info.dtype, "float32")
        self.assertEqual(list(info.moe_layers), LAYERS)
        self.assertEqual(info.hidden, REF[f"layers.{LAYERS[0]}.input"].shape[1])

    def test_forward_matches_transformers(self):
        for L in LAYERS:
            x = np.ascontiguousarray(REF[f"layers.{L}.input"])
            y = self.c.forward(L, x)
            self.assertEqual(y.shape, x.shape)
            self.assertEqual(y.dtype, np.float32)
            self.assertLess(rel_err(y, REF[f"layers.{L}.output_ref64"]), 1e-5)
            self.assertLess(rel_err(y, REF[f"layers.{L}.output"]), 1e-4)

    def test_routing_and_epoch(self):
        for L in LAYERS:
            x = np.ascontiguousarray(REF[f"layers.{L}.input"])
            y, r, epoch = self.c.forward(L, x, routing=True, return_epoch=True)
            ids, w = r
            order = np.argsort(ids, axis=1)
            np.testing.assert_array_equal(np.take_along_axis(ids, order, 1),
                                          REF[f"layers.{L}.topk_ids"])
            np.testing.assert_allclose(np.take_along_axis(w, order, 1),
                                       REF[f"layers.{L}.topk_weights"], rtol=1e-5, atol=1e-6)
            # best first
            self.assertTrue((np.diff(w, axis=1) <= 1e-7).all())
            info = self.c.epoch_info(epoch)
            self.assertEqual(info["id"], epoch)
            self.assertEqual(len(info["weights_versions"]), len(LAYERS))

    def test_trace(self):
        tracer = moeclient.Client(self.moed.sock, name="tracer")
        try:
            recs = tracer.trace(count=len(LAYERS), pid=os.getpid(), timeout=30)
            for L in LAYERS:
                self.c.forward(L, np.ascontiguousarray(REF[f"layers.{L}.input"]))
            recs = list(recs)
            # closed by its end: the session traces no more, a new trace works
            with tracer.trace(layer=LAYERS[0], timeout=0.2) as more:
                self.c.forward(LAYERS[0], np.ascontiguousarray(REF[f"layers.{LAYERS[0]}.input"]))
                self.assertEqual(next(more)["layer"], LAYERS[0])
            self.assertEqual(list(more), [])  # closed: nothing more
        finally:
            tracer.close()
        self.assertEqual([r["layer"] for r in recs], LAYERS)
        for r in recs:
            ids = REF[f"layers.{r['layer']}.topk_ids"]
            # the experts hit: transformers' routing, counted
            want = dict(zip(*np.unique(ids, return_counts=True)))
            self.assertEqual(r["experts"], {int(k): int(v) for k, v in want.items()})
            self.assertEqual(r["tokens"], ids.shape[0])
            self.assertEqual((r["pid"], r["name"], r["status"]), (os.getpid(), "pytest", 0))
            self.assertGreaterEqual(r["weights_version"], 1)
            self.assertLessEqual(sum(r["stages_ns"].values()), r["latency_ns"])
            self.assertGreater(r["stages_ns"]["experts"], 0)

    def test_float16(self):
        L = LAYERS[0]
        x = REF[f"layers.{L}.input"]
        y16 = self.c.forward(L, x.astype(np.float16))
        self.assertEqual(y16.dtype, np.float16)
        self.assertLess(rel_err(y16, REF[f"layers.{L}.output_ref64"]), 2e-2)

    def test_errors(self):
        x = np.ones((2, self.c.model_info().hidden), np.float32)
        with self.assertRaises(moeclient.MoeError) as e:
            self.c.forward(self.c.model_info().n_layers, x)  # past the model
        self.assertEqual(e.exception.code, -2)
        self.assertEqual(e.exception.name, "MOE_ENOLAYER")
        self.assertIn("MOE_ENOLAYER", str(e.exception))
        with self.assertRaises(ValueError):
            self.c.forward(LAYERS[0], np.ones((2, 3), np.float32))
        with self.assertRaises(TypeError):
            self.c.forward(LAYERS[0], x.astype(np.float64))
        with self.assertRaises(moeclient.MoeError) as e:
            moeclient.Client(os.path.join(self.moed.dir, "nothing.sock"))
        self.assertEqual(e.exception.name, "MOE_EDAEMON")

    def test_zero_copy_submit(self):
        L = LAYERS[-1]
        x = REF[f"layers.{L}.input"]
        buf = self.c.empty(x.shape[0])
        buf[:] = x
        tag = self.c.submit(L, buf, buf)
        self.c.wait(tag, 30000)
        self.assertLess(rel_err(buf, REF[f"layers.{L}.output_ref64"]), 1e-5)
        want = self.c.forward(L, np.ascontiguousarray(x))
        np.testing.assert_array_equal(buf, want)
        tag = self.c.submit(L, buf, buf)
        done = []
        for _ in range(3000):
            done += self.c.poll()
            if done:
                break
            time.sleep(0.001)
        self.assertEqual([(d.tag, d.status) for d in done], [(tag, 0)])
        self.c.free_buffer(buf)

    def test_status_and_admin(self):
        st = self.c.status()
        self.assertIn("requests", st)
        done = st["requests"]["completed"]
        text = self.c.metrics()
        self.assertIn("# TYPE moed_requests_total counter", text)
        # the metrics count what the status counts (nothing ran in between)
        self.assertIn('moed_requests_total{status="ok"} %d\n' % done, text)
        self.assertGreater(self.c.ping(), 0)
        with self.assertRaises(moeclient.MoeError) as e:
            self.c.job(12345)
        self.assertIn(e.exception.name, ("MOE_ENOENT", "MOE_EPERM"))
        if os.geteuid() == 0:  # root is moed's admin: drain and undrain
            self.assertIn("draining", self.c.drain())
            x = np.ones((1, self.c.model_info().hidden), np.float32)
            with self.assertRaises(moeclient.MoeError) as e:
                self.c.forward(LAYERS[0], x)
            self.assertEqual(e.exception.name, "MOE_ESHUTDOWN")
            self.c.undrain()
            self.c.forward(LAYERS[0], x)


class Daemon(unittest.TestCase):
    def test_split_requests(self):
        """Above max_batch_tokens moed splits; the result is the unsplit run's."""
        small = moedtest.Moed(OLMOE, "scheduler:\n  max_batch_tokens: 8\n").wait_ready()
        big = moedtest.Moed(OLMOE).wait_ready()
        try:
            with moeclient.Client(small.sock) as a, moeclient.Client(big.sock) as b:
                self.assertEqual(a.model_info().max_batch_tokens, 8)
                x = np.random.default_rng(5).standard_normal(
                    (45, a.model_info().hidden)).astype(np.float32)
                for L in LAYERS:
                    np.testing.assert_array_equal(a.forward(L, x), b.forward(L, x))
        finally:
            small.stop()
            big.stop()

    @unittest.skipUnless(os.geteuid() == 0, "the placement commands need moed's admin (root)")
    def test_placement_commands(self):
        """replicate / unreplicate / rebalance from Python, on 2 CPU ranks."""
        d = moedtest.Moed(OLMOE, "devices: cpu:2\nplacement:\n  spare_slots: 1\n").wait_ready()
        try:
            with moeclient.Client(d.sock) as c:
                L = LAYERS[0]
                x = np.random.default_rng(9).standard_normal(
                    (16, c.model_info().hidden)).astype(np.float32)
                ref = c.forward(L, x)
                r = c.replicate(L, 0, 1, wait=True)
                self.assertEqual(r["job"]["state"], 2, r)  # done
                placement = c.status()["layers"][0]["placement"][0]
                self.assertEqual(sorted(p[0] for p in placement), [0, 1])
                np.testing.assert_array_equal(c.forward(L, x), ref)
                with self.assertRaises(moeclient.MoeError) as e:
                    c.replicate(L, 0, 1)
                self.assertIn("already holds", str(e.exception))
                r = c.unreplicate(L, 0, 1, wait=True)
                self.assertEqual(r["job"]["state"], 2, r)
                with self.assertRaises(moeclient.MoeError) as e:
                    c.unreplicate(L, 0, 0)
                self.assertIn("last replica", str(e.exception))
                plan = c.rebalance(dry_run=True)["plan"]
                self.assertGreaterEqual(plan["before"], plan["after"])
                self.assertEqual(plan["layers"], len(c.model_info().moe_layers))
                np.testing.assert_array_equal(c.forward(L, x), ref)
        finally:
            d.stop()

    def test_reload_commands(self):
        """reload / rollback / version_info from Python: the fixture copied
        elsewhere (same weights, a new source), rolled in and back."""
        d = moedtest.Moed(OLMOE).wait_ready()
        tmp = tempfile.mkdtemp()
        try:
            copy = os.path.join(tmp, "copy")
            shutil.copytree(OLMOE, copy)
            with moeclient.Client(d.sock) as c:
                L = LAYERS[0]
                x = np.random.default_rng(11).standard_normal(
                    (8, c.model_info().hidden)).astype(np.float32)
                ref = c.forward(L, x)
                self.assertEqual(c.version_info(L)["version"], 1)
                r = c.reload(copy, wait=True)
                self.assertEqual(r["job"]["state"], 2, r)  # done
                v = c.version_info(L)
                self.assertEqual((v["version"], v["router_source"]), (2, 1), v)
                self.assertEqual(v["expert_sources"], [1] * len(v["expert_sources"]))
                self.assertEqual(len(v["expert_versions"]), len(c.status()["layers"][0]
                                                                ["expert_tokens"]))
                src = c.status()["weights"]["sources"]
                self.assertEqual(src[1]["path"], copy)
                np.testing.assert_array_equal(c.forward(L, x), ref)
                old = c.version_info(L, 1)
                self.assertEqual(old["router_source"], 0)
                r = c.rollback(wait=True)
                self.assertEqual(r["job"]["state"], 2, r)
                v = c.version_info(L)
                self.assertTrue(v["rollback"])
                self.assertEqual((v["version"], v["router_source"]), (3, 0), v)
                r = c.reload(os.path.join(tmp, "missing"), wait=True)
                self.assertEqual(r["job"]["state"], 4, r)  # failed
                self.assertIn("No such file", r["job"]["message"])
                with self.assertRaises(moeclient.MoeError):
                    c.version_info(L, 99)
        finally:
            d.stop()
            shutil.rmtree(tmp)

    def test_connect_timeout(self):
        """A client that starts before moed connects once moed listens."""
        m = moedtest.Moed.__new__(moedtest.Moed)
        holder = {}

        def start_later():
            time.sleep(0.3)
            holder["m"] = moedtest.Moed(OLMOE)

        t = threading.Thread(target=start_later)
        t.start()
        sock_dir = None
        try:
            # the socket path is only known once the Moed exists: wait for it
            while "m" not in holder:
                time.sleep(0.01)
            sock_dir = holder["m"].sock
            with moeclient.Client(sock_dir, connect_timeout=30.0) as c:
                self.assertEqual(c.model_info().family, "olmoe")
        finally:
            t.join()
            holder["m"].stop()
        del m


if __name__ == "__main__":
    unittest.main()
