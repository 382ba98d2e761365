"""Device choice: MPS, then CUDA, then CPU, unless LLM_GUARD_DEVICE says otherwise (pure, no torch needed)."""

import pytest
from ollama_guard.device import choose_device, cpu_threads


@pytest.mark.parametrize(
    "available,expected",
    [
        ({"mps": True, "cuda": True, "cpu": True}, "mps"),
        ({"mps": False, "cuda": True, "cpu": True}, "cuda"),
        ({"mps": False, "cuda": False, "cpu": True}, "cpu"),
    ],
)
def test_auto_prefers_mps_then_cuda_then_cpu(available, expected):
    assert choose_device("auto", available, False, False).name == expected


def test_explicit_device_and_fallback_when_missing():
    assert choose_device("cuda", {"mps": True, "cuda": True, "cpu": True}, False, False).name == "cuda"
    fallback = choose_device("cuda", {"mps": False, "cuda": False, "cpu": True}, False, True)
    assert fallback.name == "cpu" and fallback.fp16 is False and "not available" in fallback.reason


def test_fp16_only_on_gpus_and_only_when_enabled():
    assert choose_device("auto", {"mps": True, "cpu": True}, True, False).fp16 is True
    assert choose_device("auto", {"mps": True, "cpu": True}, False, False).fp16 is False
    assert choose_device("auto", {"cuda": True, "cpu": True}, True, True).fp16 is True
    assert choose_device("cpu", {"cuda": True, "cpu": True}, True, True).fp16 is False


def test_cpu_threads_follow_the_cores_this_process_may_use():
    assert cpu_threads(3) == 3
    assert cpu_threads(None) >= 1
