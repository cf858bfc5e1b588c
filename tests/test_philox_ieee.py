"""``philox-ieee``: the C kernel against its torch-ops reference, bit for bit, and the
trust rules around building and loading it (a library that cannot be trusted is refused)."""

from __future__ import annotations

import ctypes
import logging
import math

import pytest
import torch

from zo import native, philox_ieee
from zo.engine import EngineConfig, PerturbationEngine
from zo.philox import philox_values
from zo.philox_ieee import (
    PhiloxIEEEGenerator,
    _Constants,
    _cos_sin,
    _radius,
    native_kernel,
    reference_values,
)

LAWS = ["gaussian", "rademacher"]


@pytest.fixture(scope="module")
def kernel():
    return native_kernel()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize(
    ("seed", "index", "start", "count"),
    [
        (0, 0, 0, 1),
        (1, 2, 3, 5),
        (2**63 - 1, 7, 1_000_001, 70_001),
        (12345, 1, 4 * (2**32 - 9), 301),  # counters whose low word wraps inside a vector
        (99, 2**31 + 5, 17, 4096 + 3),
    ],
)
def test_the_kernel_equals_the_torch_reference_bit_for_bit(kernel, law, seed, index, start, count):
    got = torch.empty(count)
    kernel.fill(got, seed, index, start, int(law == "gaussian"))
    assert torch.equal(bits(got), bits(reference_values(seed, index, start, count, law, "cpu")))


def test_rademacher_values_are_philox_values():
    """The counters are philox's: only the gaussian transform differs."""
    ours = reference_values(5, 3, 11, 999, "rademacher", "cpu")
    assert torch.equal(ours, philox_values(5, 3, 11, 999, "rademacher", "cpu"))


def test_the_transform_is_accurate_to_its_stated_bounds():
    """Every radius and angle the 24-bit words can give, sampled densely: ln within 3e-7
    (relative to |ln u| >= 6e-8), cos and sin within 3e-8 plus fp32 rounding."""
    c = _Constants(torch.device("cpu"))
    words = torch.arange(0, 1 << 24, 61, dtype=torch.int64) << 8
    u = ((words >> 8) + 1).double() / 2**24
    radius = _radius(words, c).double()
    exact = torch.sqrt(-2 * torch.log(u))
    assert torch.allclose(radius, exact, rtol=4e-7, atol=1e-6)
    cosine, sine = _cos_sin(words, c)
    angle = (words >> 8).double() / 2**24 * 2 * math.pi
    assert (cosine.double() - torch.cos(angle)).abs().max() < 2e-7
    assert (sine.double() - torch.sin(angle)).abs().max() < 2e-7


def test_gaussian_values_have_the_moments_of_a_standard_normal(kernel):
    z = torch.empty(1 << 21)
    kernel.fill(z, 2024, 0, 0, 1)
    z = z.double()
    assert abs(z.mean()) < 4e-3 and abs(z.var() - 1) < 4e-3
    assert abs((z**3).mean()) < 1e-2 and abs((z**4).mean() - 3) < 3e-2
    normal = torch.distributions.Normal(0.0, 1.0)
    for q in (-2.0, -1.0, 0.0, 0.5, 1.5):  # the CDF at a few points, to within noise
        assert abs((z <= q).double().mean() - normal.cdf(torch.tensor(q))) < 2e-3


@pytest.mark.parametrize("decay", [False, True])
def test_the_fused_pass_equals_the_reference_pass(kernel, monkeypatch, decay):
    """The kernel's draw-scale-add against torch ops drawing the same values: in place,
    into other buffers, several seeds, slices starting mid-tensor (a shard's rows)."""
    fused = PhiloxIEEEGenerator("gaussian", 2)
    weights = [torch.randn(n) for n in (3, 1000, 70_003)]
    targets = [torch.empty_like(w) for w in weights]
    coefficients = torch.tensor([0.999, 0.5, -0.25, 3.0])
    starts = [0, 5, 1_234_567]
    fused.axpz(weights, targets, [0, 1, 2], [11, 12, 13], coefficients, 1e-3, decay, starts)
    in_place = [w.clone() for w in weights]
    fused.axpz(in_place, in_place, [0, 1, 2], [11, 12, 13], coefficients, 1e-3, decay, starts)

    monkeypatch.setattr(philox_ieee, "native_kernel", _unavailable)
    reference = [torch.empty_like(w) for w in weights]
    PhiloxIEEEGenerator("gaussian", 1).axpz(
        weights, reference, [0, 1, 2], [11, 12, 13], coefficients, 1e-3, decay, starts
    )
    for got, same, want in zip(targets, in_place, reference, strict=True):
        assert torch.equal(bits(got), bits(want))
        assert torch.equal(bits(same), bits(want))


def test_an_engine_step_gives_the_same_weights_with_and_without_the_kernel(monkeypatch):
    """A perturbed copy, an output-side embedding and the update, through the engine."""
    embedding = torch.nn.Embedding(50, 8)
    weights = [embedding.weight, torch.randn(33, 8)]
    config = EngineConfig(generator="philox-ieee", threads=2, offload_threshold=16)

    def step(params):
        engine = PerturbationEngine(params, config)
        copy = engine.perturbed_copy(9, 1, 1e-2)
        with engine.perturbed(9, 1e-2):
            out = embedding(torch.tensor([[1, 4, 4, 49]]))
        engine.update([9, 10], [0.5, -0.5])
        return [copy, out, *[p.detach().clone() for p in params]]

    with torch.no_grad():
        start = [w.clone() for w in weights]
        fast = step(weights)
        for w, s in zip(weights, start, strict=True):
            w.copy_(s)
        monkeypatch.setattr(philox_ieee, "native_kernel", _unavailable)
        slow = step(weights)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(bits(a), bits(b))


def _unavailable():
    raise native.NativeUnavailable("test: no kernel")


def test_without_a_kernel_the_generator_says_so_once_and_draws_the_same_values(
    kernel, monkeypatch, caplog
):
    monkeypatch.setattr(philox_ieee, "native_kernel", _unavailable)
    monkeypatch.setattr("zo.direction_base._SAID", set())
    generator = PhiloxIEEEGenerator("gaussian")
    out = torch.empty(1001)
    with caplog.at_level(logging.WARNING, logger="zo.philox_ieee"):
        generator.fill(out, 3, 1, 7)
        generator.fill(out, 3, 1, 7)
    said = [r.getMessage() for r in caplog.records if "philox-ieee" in r.getMessage()]
    assert len(said) == 1 and "test: no kernel" in said[0]
    fast = torch.empty(1001)
    kernel.fill(fast, 3, 1, 7, 1)
    assert torch.equal(bits(out), bits(fast))


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(native.NativeUnavailable, match="no C compiler found.*torch-blocks"):
        native.compiler()


def test_a_failed_build_names_the_compiler_output(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(native.NativeUnavailable, match="exit 3.*out of cheese"):
        native.build(str(fake), tmp_path / "lib.so")
    assert not list(tmp_path.glob("*.so*")), "a failed build leaves no file behind"


def test_a_damaged_library_is_refused_naming_its_file(tmp_path):
    damaged = tmp_path / "philox_ieee-damaged.so"
    damaged.write_bytes(b"\x7fELF not really")
    with pytest.raises(native.NativeUnavailable, match="philox_ieee-damaged.so.*delete"):
        native.load_checked(damaged, reference_values)


def test_a_library_that_disagrees_with_the_reference_is_refused(kernel, monkeypatch):
    wrong = lambda seed, index, start, count, law, device: torch.zeros(count)  # noqa: E731
    with pytest.raises(native.NativeMismatch, match=f"{kernel.path.name}.*refusing it"):
        native.load_checked(kernel.path, wrong)


def test_the_library_is_cached_under_a_key_of_source_compiler_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("ZO_NATIVE_CACHE", str(tmp_path))
    cc = native.compiler()
    path = native.library_path(cc)
    assert path.parent == tmp_path
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DANOTHER"))
    assert native.library_path(cc) != path


def test_auto_takes_torch_blocks_on_a_cpu_without_the_kernel_and_says_why(monkeypatch, caplog):
    from zo import directions

    assert directions.default_generator("cpu") == "philox-ieee"
    monkeypatch.setattr(directions, "native_kernel", _unavailable)
    monkeypatch.setattr("zo.direction_base._SAID", set())
    with caplog.at_level(logging.WARNING, logger="zo.directions"):
        assert directions.default_generator("cpu") == "torch-blocks"
        assert directions.default_generator("cpu") == "torch-blocks"
    said = [r.getMessage() for r in caplog.records if "auto" in r.getMessage()]
    assert len(said) == 1 and "torch-blocks" in said[0] and "test: no kernel" in said[0]


def test_a_failed_build_is_not_retried_in_the_process(monkeypatch):
    calls = []

    def failing(reference):
        calls.append(reference)
        raise native.NativeUnavailable("test: no compiler")

    monkeypatch.setattr(native, "philox_ieee_kernel", failing)
    monkeypatch.setattr(philox_ieee, "_KERNEL", [])
    for _ in range(3):
        with pytest.raises(native.NativeUnavailable, match="test: no compiler"):
            philox_ieee.native_kernel()
    assert len(calls) == 1


def test_rows_without_the_kernel_read_no_ids_on_the_host_and_equal_the_kernels(kernel, monkeypatch):
    from zo.opcount import OpCounter

    ids = torch.tensor([[3, 0, 49], [3, 7, 1]])
    fast = torch.zeros(6, 8)
    PhiloxIEEEGenerator("gaussian").rows_add(fast, ids, 5, 2, (50, 8), 0.5)
    monkeypatch.setattr(philox_ieee, "native_kernel", _unavailable)
    slow = torch.zeros(6, 8)
    with OpCounter() as counter:  # the implementation's own ops, as a CUDA run's
        philox_ieee._rows_add(slow, ids, 5, 2, 8, 0.5, "gaussian")
    assert counter.result.syncs == []
    assert torch.equal(bits(fast), bits(slow))


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(native.NativeUnavailable, match="cannot write the kernel cache.*ZO_NATIVE"):
        native.build(native.compiler(), blocked / "sub" / "lib.so")


def test_an_update_with_unit_decay_is_the_update_without_decay(kernel):
    """``update_device`` always passes a decay; at 1.0 the kernel takes the one-pass form,
    which must equal the decayed form bit for bit (x * 1 == x)."""
    weights = torch.randn(10_007)
    generator = PhiloxIEEEGenerator("gaussian")
    unit, plain = weights.clone(), weights.clone()
    generator.axpz([unit], [unit], [3], [21], torch.tensor([1.0, -0.5]), 1e-3, True)
    generator.axpz([plain], [plain], [3], [21], torch.tensor([1.0, -0.5]), 1e-3, False)
    z = reference_values(21, 3, 0, 10_007, "gaussian", "cpu")
    assert torch.equal(bits(unit), bits(plain))
    assert torch.equal(bits(unit), bits(weights * torch.tensor(1.0) + z * torch.tensor(-0.5e-3)))


def test_the_kernel_runs_on_torchs_own_openmp_threads(kernel):
    """One thread pool, not two competing for the cores: torch ships libgomp under its
    soname, and the library built with -fopenmp is bound to that runtime."""
    assert kernel.serial_reason is None
    assert native._shares_torch_threads(ctypes.CDLL(str(kernel.path)))

    before = torch.get_num_threads()

    class OwnRuntime:  # sets a thread count that torch never sees
        zo_openmp_set_threads = staticmethod(lambda threads: 2)

    assert not native._shares_torch_threads(OwnRuntime())
    assert torch.get_num_threads() == before  # the probe put torch's count back


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("piece", [4, 99, 1 << 18])
def test_a_threaded_pass_over_many_tensors_equals_the_reference(kernel, threads, piece):
    """Pieces, threads and tensor boundaries never change a value."""
    lengths = [1001, 0, 7, 4096 + 5, 1]
    sources = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in lengths]
    targets = [torch.empty(n) for n in lengths]
    starts, indices, seeds, factors = (
        [5, 0, 2**33 + 1, 3, 8],
        [2, 0, 4, 1, 9],
        [11, 12],
        [0.5, -2.0],
    )
    kernel.axpz_many(
        sources, targets, indices, starts, seeds, factors, True, 0.75, 1, threads, piece
    )
    for source, target, index, start in zip(sources, targets, indices, starts, strict=True):
        z = [reference_values(s, index, start, source.numel(), "gaussian", "cpu") for s in seeds]
        want = (source * torch.tensor(0.75) + z[0] * torch.tensor(0.5)) + z[1] * torch.tensor(-2.0)
        assert torch.equal(bits(target), bits(want))


def test_a_compiler_without_openmp_builds_the_kernel_serial_and_says_so_once(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("ZO_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP_FLAGS", ("-fno-such-openmp-flag",))
    serial = native.philox_ieee_kernel(reference_values)
    assert "building it with OpenMP failed" in serial.serial_reason
    assert [p.name for p in tmp_path.iterdir()] == [
        native.library_path(native.compiler(), False).name
    ]
    monkeypatch.setattr(philox_ieee, "_KERNEL", [serial])
    monkeypatch.setattr("zo.direction_base._SAID", set())
    source = torch.randn(3 * native.PIECE + 5)
    targets = [torch.empty_like(source) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="zo.philox_ieee"):
        for target in targets:
            philox_ieee._axpz([source], [target], [1], [7], torch.tensor([1.0, 0.1]), 1.0, False,
                              "gaussian", 2, [0])  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "Python draw threads" in r.getMessage()]
    assert len(said) == 1 and "building it with OpenMP failed" in said[0]
    want = source + reference_values(7, 1, 0, source.numel(), "gaussian", "cpu") * torch.tensor(0.1)
    assert all(torch.equal(bits(t), bits(want)) for t in targets)


def test_a_library_with_an_openmp_runtime_of_its_own_is_used_serially(kernel, monkeypatch):
    monkeypatch.setattr(native, "_shares_torch_threads", lambda library: False)
    loaded = native.load_checked(kernel.path, reference_values)
    assert "runtime of its own" in loaded.serial_reason


def test_threads_asking_for_the_kernel_at_once_load_it_once(kernel, monkeypatch):
    """One build, one load and one runtime probe, however many draw threads ask first."""
    import threading
    import time

    loads = []

    def slow_load(reference):
        loads.append(reference)
        time.sleep(0.05)
        return kernel

    monkeypatch.setattr(native, "philox_ieee_kernel", slow_load)
    monkeypatch.setattr(philox_ieee, "_KERNEL", [])
    threads = [threading.Thread(target=philox_ieee.native_kernel) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
