"""Recording benchmark runs: the timing helpers, the record header, the result files, and the runner of all scripts."""

import datetime
import json
import sys
import tarfile
from dataclasses import dataclass

import pytest
import torch

from unlearnkit.benchmarking import (
    benchmark_parser,
    describe_device,
    median_reported,
    median_seconds,
    parse_benchmark_args,
    record_header,
    run_summary,
    write_results,
)

HEADER_FIELDS = {"benchmark", "date", "device", "device_type", "torch", "python", "cuda", "threads",
                 "load_average_1min"}


@dataclass
class Reported:
    seconds: float
    call: int


def test_median_seconds_times_after_a_warm_up_and_describe_device_names_the_cpu():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), torch.device("cpu"), repeats=3)
    assert len(calls) == 4 and 0 <= seconds < 0.1
    median_seconds(lambda: calls.append(1), torch.device("cpu"), repeats=1, warm_up=False)
    assert len(calls) == 5  # the caller's own run was the warm-up
    name = describe_device(torch.device("cpu"))
    assert name and "threads" not in name  # run_summary adds the thread count once, from the record


def test_median_reported_ignores_the_warm_up_and_keeps_every_timed_result():
    reported_seconds = iter([100.0, 3.0, 1.0, 2.0])  # the slow first call is the warm-up
    calls = []

    def run() -> Reported:
        calls.append(len(calls))
        return Reported(next(reported_seconds), calls[-1])

    runs = median_reported(run, repeats=3)
    assert len(calls) == 4
    assert runs.median == 2.0 and runs.seconds == [3.0, 1.0, 2.0]
    assert [r.call for r in runs.results] == [1, 2, 3] and runs.last.call == 3


def test_median_reported_takes_plain_seconds_too_and_needs_a_timed_call():
    reported_seconds = iter([9.0, 4.0, 6.0])
    assert median_reported(lambda: next(reported_seconds), repeats=2).median == 5.0
    with pytest.raises(ValueError, match="at least 1"):
        median_reported(lambda: 1.0, repeats=0)


def test_record_header_says_what_ran_where_and_when():
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    header = record_header("demo", torch.device("cpu"))
    assert set(header) == HEADER_FIELDS
    assert header["benchmark"] == "demo" and header["device_type"] == "cpu"
    assert header["device"] == describe_device(torch.device("cpu"))
    assert header["torch"] == torch.__version__ and header["cuda"] == torch.version.cuda
    assert header["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert header["threads"] == torch.get_num_threads()
    date = datetime.datetime.fromisoformat(header["date"])
    assert date.utcoffset() == datetime.timedelta(0) and date.microsecond == 0
    assert before <= date <= before + datetime.timedelta(seconds=5)
    assert header["load_average_1min"] is None or header["load_average_1min"] >= 0
    json.dumps(header)  # a record must be writable as it is


def test_write_results_writes_the_json_and_the_markdown_side_by_side(tmp_path):
    record = record_header("demo", torch.device("cpu")) | {"rows": [{"seconds": 1.5}]}
    results = tmp_path / "new" / "results"
    stem = write_results(record, "| a |\n|---|", "demo_full", torch.device("cpu"), results)
    assert stem == results / "demo_full_cpu"
    json_text = (results / "demo_full_cpu.json").read_text()
    assert json_text.endswith("}\n") and json_text.startswith('{\n  "benchmark": "demo"')
    assert json.loads(json_text) == record
    assert (results / "demo_full_cpu.md").read_text() == "| a |\n|---|\n"
    write_results(record | {"rows": []}, "again\n", "demo_full", torch.device("cpu"), results)
    assert json.loads((results / "demo_full_cpu.json").read_text())["rows"] == []
    assert sorted(p.name for p in results.iterdir()) == ["demo_full_cpu.json", "demo_full_cpu.md"]


def test_the_runner_goes_on_past_a_failing_script_and_names_it(tmp_path, capfd, benchmark_script):
    failing = tmp_path / "bench_fails.py"
    failing.write_text("raise SystemExit(3)\n")
    passing = tmp_path / "bench_passes.py"
    passing.write_text("import pathlib, sys\n"
                       "pathlib.Path(sys.argv[0]).with_suffix('.args').write_text(' '.join(sys.argv[1:]))\n")
    failed = benchmark_script("run_all").run_scripts([failing, passing], ["--device", "cpu", "--results", "out"])
    assert failed == ["bench_fails.py"]
    assert passing.with_suffix(".args").read_text() == "--device cpu --results out"
    output = capfd.readouterr().out
    assert "bench_fails.py: FAILED (exit code 3)" in output and "bench_passes.py: ok" in output


def test_run_summary_names_the_machine_and_copes_without_a_load_average():
    record = record_header("demo", torch.device("cpu"))
    summary = run_summary(record)
    assert record["device"] in summary and record["date"] in summary and "CUDA" not in summary
    gpu = record | {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "cuda": "12.8",
                    "load_average_1min": None}  # Windows has no load average
    assert run_summary(gpu).startswith("NVIDIA H100 80GB HBM3, torch ") and "(CUDA 12.8)" in run_summary(gpu)
    assert "load average unknown" in run_summary(gpu)


def test_the_runner_picks_scripts_by_name_and_archives_the_results(tmp_path, benchmark_script):
    run_all = benchmark_script("run_all")
    assert [p.name for p in run_all.select_scripts(["cifar", "bench_sisa.py"])] == ["bench_cifar.py", "bench_sisa.py"]
    assert len(run_all.select_scripts(None)) == len(list(run_all.BENCHMARKS.glob("bench_*.py"))) >= 7
    with pytest.raises(SystemExit, match="no benchmark called nonsense; choose from cifar"):
        run_all.select_scripts(["nonsense"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo_cpu.json").write_text("{}\n")
    (results / "demo_cpu.md").write_text("# demo\n")
    archive = tmp_path / "out" / "results.tar.gz"
    archive.parent.mkdir()
    run_all.archive_results(results, archive)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["demo_cpu.json", "demo_cpu.md"]
        assert tar.extractfile("demo_cpu.md").read() == b"# demo\n"
    assert [p.name for p in archive.parent.iterdir()] == ["results.tar.gz"]


def test_the_shared_options_parse_refuse_counts_below_one_and_set_the_threads(tmp_path, capsys):
    parser = benchmark_parser("Demo benchmark.\n\n    python bench_demo.py", repeats=3, results=tmp_path)
    args = parse_benchmark_args(parser, [])
    assert (args.device, args.repeats, args.threads, args.results) == ("auto", 3, None, tmp_path)
    for option in ("--repeats", "--threads"):
        with pytest.raises(SystemExit):
            parse_benchmark_args(parser, [option, "0"])
        assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
    threads = torch.get_num_threads()
    try:
        assert parse_benchmark_args(parser, ["--threads", "1"]).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    parser.print_help()
    assert "python bench_demo.py" in capsys.readouterr().out  # the usage lines of the docstring, as written


@pytest.mark.parametrize("name", ["cifar", "gradient", "imu", "influence", "mimu", "sisa", "training"])
def test_every_benchmark_script_takes_the_shared_options(name, benchmark_script, capsys):
    script = benchmark_script(f"bench_{name}")
    with pytest.raises(SystemExit):
        script.main(["--threads", "0"])  # refused while parsing, before anything is loaded or timed
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_the_runner_passes_the_thread_count_on(tmp_path, benchmark_script, monkeypatch):
    run_all = benchmark_script("run_all")
    seen = []
    monkeypatch.setattr(run_all, "run_scripts", lambda scripts, options, after_each: seen.append(options) or [])
    assert run_all.main(["--only", "imu", "--threads", "1", "--results", str(tmp_path)]) == 0
    assert seen == [["--device", "auto", "--results", str(tmp_path), "--threads", "1"]]
