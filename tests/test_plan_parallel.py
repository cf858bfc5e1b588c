"""``zo plan --gpus N --gpu-memory SIZE`` prints what :mod:`zo.memory.parallel` computes:
one device's peak, the per-rank peak sharded over N, the device peak and host memory
offloaded, and ``what_fits``'s verdict; bad input is a usage error."""

from __future__ import annotations

import json

import pytest

from zo.commands import main, make_parser
from zo.commands.plan import request_from_options
from zo.memory import shapes
from zo.memory.parallel import plan_offloaded, plan_sharded, what_fits
from zo.memory.step import GIB, plan_memory


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def library_request(*argv: str):
    """The request the CLI plans, read from the same options."""
    return request_from_options(make_parser("plan").parse_args(["plan", *argv]))[0]


@pytest.mark.parametrize(
    ("model", "gpus", "memory", "fitting"),
    [
        ("opt-13b", 8, 80, ["single", "fsdp", "offload"]),
        ("opt-66b", 8, 80, ["fsdp", "offload"]),  # 66B in bf16 is more than one 80 GiB device
        ("llama-2-70b", 2, 40, ["offload"]),  # two ranks each hold half: over 40 GiB
    ],
)
def test_the_cli_prints_the_librarys_plans_and_verdict(model, gpus, memory, fitting, capsys):
    argv = ["--model", model, "--dtype", "bfloat16", "--device", "cuda", "--gpus", str(gpus)]
    argv += ["--gpu-memory", f"{memory}GiB"]
    out = plan_json(capsys, *argv)
    request = library_request(*argv)
    assert request.shape.parameters() == shapes.resolve_shape(model).parameters()
    sharded, offloaded = plan_sharded(request, gpus), plan_offloaded(request)
    modes = {row["mode"]: row for row in out["modes"]}
    assert modes["single"]["device_peak_bytes"] == plan_memory(request).process_total
    assert modes["fsdp"]["device_peak_bytes"] == sharded.device_peak
    assert modes["fsdp"]["devices"] == gpus
    assert modes["offload"]["device_peak_bytes"] == offloaded.device_peak
    assert modes["offload"]["host_bytes"] == offloaded.host_bytes
    verdict = what_fits(request, gpus, memory * GIB)
    assert [row["fits"] for row in out["modes"]] == list(verdict.values())
    assert out["fits"] == fitting
    assert out["gpus"] == gpus and out["gpu_memory_bytes"] == memory * GIB
    assert out["assumptions"]["dtype"]["value"] == "bfloat16"

    assert main(["plan", *argv]) == 0
    text = capsys.readouterr().out
    assert f"{sharded.device_peak / GIB:.2f} GiB" in text
    assert f"{offloaded.host_bytes / GIB:.2f} GiB" in text


@pytest.mark.parametrize(
    "argv", [["--estimator", "zo_adam"], ["--trainable", "lora"], ["--trainable", "mask:0.001"]]
)
def test_a_mode_that_does_not_run_the_request_says_why_and_the_others_are_planned(argv, capsys):
    # FSDP runs ZO-Adam, LoRA and masks; offload runs ZO-SGD over full weights only. Each mode
    # is planned on its own: the offload refusal once blanked the sharded row too
    out = plan_json(capsys, "--model", "opt-13b", *argv, "--gpus", "4", "--gpu-memory", "1TiB")
    single, fsdp, offload = out["modes"]
    request = library_request("--model", "opt-13b", *argv, "--gpus", "4")
    assert fsdp["device_peak_bytes"] == plan_sharded(request, 4).device_peak
    assert fsdp["refused"] is None and fsdp["fits"] is True
    assert offload["device_peak_bytes"] is None and offload["fits"] is None
    assert "ZO-SGD" in offload["refused"]
    assert single["fits"] is True and out["fits"] == ["single", "fsdp"]


def test_a_request_no_parallel_mode_runs_says_why_in_both_rows(capsys):
    out = plan_json(
        capsys, "--model", "opt-13b", "--quant", "nf4", "--trainable", "lora", "--gpus", "2"
    )
    _, fsdp, offload = out["modes"]
    assert "sharded plans cover" in fsdp["refused"] and "ZO-SGD" in offload["refused"]


def test_the_new_presets_have_their_published_parameter_counts():
    assert shapes.resolve_shape("llama-2-70b").parameters() == 68_976_648_192
    assert shapes.resolve_shape("llama2-70b").parameters() == 68_976_648_192
    for name, billions in (("opt-30b", 30), ("opt-66b", 66)):
        assert abs(shapes.resolve_shape(name).parameters() / 1e9 - billions) / billions < 0.01


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "0", "--gpu-memory", "80GiB"], "--gpus must be 1 or more, got 0"),
        (["--gpus", "-2"], "--gpus must be 1 or more, got -2"),
        (["--gpus", "2", "--gpu-memory", "80XB"], "--gpu-memory '80XB' is not a size"),
        (["--gpu-memory", "0GiB"], "--gpu-memory '0GiB' is not a size above zero"),
        (["--gpus", "2", "--budget", "8GiB"], "use one or the other"),
    ],
)
def test_bad_input_is_a_usage_error(argv, message, capsys):
    assert main(["plan", "--model", "opt-13b", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_gpu_count_that_is_not_a_number_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "opt-13b", "--gpus", "eight"])
    assert exit_.value.code == 2
    assert "--gpus: invalid int value: 'eight'" in capsys.readouterr().err
