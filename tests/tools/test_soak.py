"""tools/soak.py, short: a server under the hostile mix ends with every status expected, nothing
hung, every KV block free and no leak, and exits 0 on SIGTERM."""

import json
import os
import subprocess
import sys

from tests.server.conftest import ENGINE_LIMITS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_short_soak(tmp_path):
    cache = os.environ.get("JAXSERVE_TEST_JAX_CACHE", "/tmp/jaxserve-test-jax-cache")
    server_args = [f"--{k}={v}" for k, v in ENGINE_LIMITS.items()]
    server_args += ["--noprecompile", f"--compilation_cache_dir={cache}"]
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.soak", "--requests=40", "--duration_s=6",
         "--concurrency=8", "--max_tokens=16", "--cancel_share=0.3", "--deadline_share=0.15",
         "--hostile_share=0.1", "--rss_growth_mb=500",  # RSS: the long soak's (too short here)
         f"--server_args={','.join(server_args)}", f"--json_out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["unexpected"] == 0 and report["hangs"] == 0 and report["exit_code"] == 0
    assert 0 < report["calls"] <= 40
    assert report["statuses"]["normal"].get("OK", 0) > 0
    leaks = report["leaks"]
    assert leaks["kv_blocks_free"] == leaks["kv_blocks"] == ENGINE_LIMITS["num_kv_blocks"]
    assert leaks["in_flight"] == 0 and not leaks["leaked"]
    assert "unexpected" in result.stdout and "KV blocks free" in result.stdout  # the table
