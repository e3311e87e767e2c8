"""Helpers for the moeclient tests (unittest, stdlib only): a moed of this
build tree on a model.

MOED_BIN_DIR (default: <repo>/build-rel/bin, then build/bin) names the
build; MOECLIENT_LIB is set to its libmoeclient.so.1 unless given.
"""

import os
import subprocess
import tempfile
import time

import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def bin_dir():
    d = os.environ.get("MOED_BIN_DIR")
    if d:
        return d
    for b in ("build-rel", "build", "build-ci/release"):
        p = os.path.join(REPO, b, "bin")
        if os.path.exists(os.path.join(p, "moed")):
            return p
    sys.exit("no moed build found: set MOED_BIN_DIR")


os.environ.setdefault("MOECLIENT_LIB",
                      os.path.join(os.path.dirname(bin_dir()), "lib", "libmoeclient.so.1"))


class Moed:
    """A moed process on `model` with an optional moe.yaml body."""

    def __init__(self, model, config="", extra_args=()):
        self.dir = tempfile.mkdtemp(prefix="moeclient-test-")
        self.sock = os.path.join(self.dir, "moed.sock")
        self.log = os.path.join(self.dir, "moed.log")
        cfg = os.path.join(self.dir, "moe.yaml")
        with open(cfg, "w") as f:
            f.write(f"model:\n  path: {model}\n{config}")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [os.path.join(bin_dir(), "moed"), "-c", cfg, "--socket", self.sock,
                 *extra_args], stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=30.0):
        end = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("moed did not start:\n" + open(self.log).read())
            time.sleep(0.01)
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


