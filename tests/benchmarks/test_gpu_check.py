"""scripts/gpu_check.sh --dry-run: the one-shot GPU check's code path on CPU at tiny shapes (issue #16), so that the
GPU run cannot fail on a typo.  Every section is present and none failed."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## bf16 matmul reference", "## Parity vs transformers (fp32 and bf16)",
            "## Anchored training step through Megatron DDP",
            "## MoE layer forward + backward vs Megatron stock MoELayer",
            "## Full layer forward + backward vs Megatron stock MoE layer")


def test_gpu_check_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "tmp.md"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1",
                                                 TOKENIZERS_PARALLELISM="false"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for section in SECTIONS:
        assert section in text, f"missing {section!r}"
    assert "failed" not in text.lower(), text
    assert "5 of 5 sections ran." in text
    for verdict in ("fp32 parity", "bf16 parity", "public expert bytes unchanged after the steps: **True**",
                    "owner's expert changed (every tensor): **True**", "verdict: **ok**"):
        assert verdict in text, verdict
    assert "GPU: none (CPU dry run" in text and "Date: " in text
    # the MoE section times both expert paths: the dense mixture (selected at top-k = E) and the dispatcher
    assert "| FlexOlmo, all experts train, path `dense` |" in text
    assert "| FlexOlmo, anchored, token dispatcher |" in text
