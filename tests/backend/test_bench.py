"""`pbnds bench` end to end on a tiny frame: the table, the extrapolation and the light module import."""

import subprocess
import sys

from backend import bench
from backend.cli import build_parser, main


def test_bench_writes_a_markdown_table(tmp_path, capsys):
    import torch

    output = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--sizes", "40x32", "--rays", "8", "--repeat", "1", "--paper-pixels", "16",
                     "--threads", "1", "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide; later tests keep theirs
    text = output.read_text()
    assert text in capsys.readouterr().out
    assert "| device | size |" in text and "torch" in text and "cores" in text
    assert "Threads: 1 torch CPU thread (--threads)." in text
    assert "Command: `pbnds bench --sizes 40x32 --rays 8 --precisions fp32,bf16 --paper-pixels 16 " \
        "--sampling importance --repeat 1 --threads 1`" in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 2 * len(bench.VARIANTS)  # fp32 and bf16
    paper = [r for r in rows if "pbnds-paper (reference) *16" in r and "| fp32 |" in r]
    assert paper and paper[0].rstrip().endswith("| 1.0x |")
    assert all(r.rstrip().endswith("x |") for r in rows)


def test_quick_runs_one_thread_fp32_and_says_so(tmp_path):
    import torch

    output = tmp_path / "quick.md"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["bench", "--quick", "--sizes", "40x32", "--rays", "8", "--repeat", "1", "--paper-pixels", "16",
                     "--devices", "cpu", "--output", str(output)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    text = output.read_text()
    assert "torch threads 1" in text
    assert "Threads: 1 torch CPU thread (the --quick default)." in text
    assert "--precisions fp32 --paper-pixels 16 --sampling importance --repeat 1 --threads 1 --devices cpu`" in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == len(bench.VARIANTS) and all("| fp32 |" in r for r in rows)  # reference and fast paths
    assert any("pbnds-paper (reference)" in r for r in rows) and any("default, shader only" in r for r in rows)


def test_settings_quick_and_full_defaults():
    def parse(*argv):
        return bench.resolve(build_parser().parse_args(["bench", *argv]))

    quick, full = parse("--quick"), parse()
    assert (quick["sizes"], quick["rays"], quick["precisions"], quick["repeat"], quick["threads"]) \
        == ("256x256", "64", "fp32", 3, 1)
    assert full["threads"] is None and full["threads_source"] == "not set: torch's default"
    assert full["sizes"] == bench.DEFAULT_SIZES and full["precisions"] == "fp32,bf16" and full["repeat"] == 5
    assert parse("--quick", "--threads", "2")["threads"] == 2


def test_relight_table_breaks_out_the_transport(capsys):
    assert main(["bench", "--relight", "--sizes", "40x32", "--rays", "8", "--repeat", "2", "--devices", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu |")]
    assert len(rows) == 1
    total, transport, rest = (float(cell) for cell in rows[0].strip("| ").split(" | ")[3:])
    assert 0 < transport < total and rest >= 0


def test_optimisation_steps_table(monkeypatch, capsys):
    monkeypatch.setattr(bench, "optimisation_steps", lambda args, repeat: "| step | ms | vs plain |\n")
    assert main(["bench", "--steps", "--repeat", "1"]) == 0
    assert "| step | ms | vs plain |" in capsys.readouterr().out


def test_importing_the_bench_module_does_not_import_torch():
    code = "import sys, backend.bench; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
