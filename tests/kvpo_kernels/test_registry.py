"""The backend registry: selection order, errors, explain and info."""

import pytest
import torch

import kvpo_kernels
from kvpo_kernels import registry


def test_info_reports_backends():
    text = kvpo_kernels.info()
    assert f"kvpo_kernels {kvpo_kernels.__version__}" in text
    assert "torch  cpu   usable" in text
    assert "cpp    cpu   usable" in text  # the extension is built by the install step
    assert "triton cpu   usable" in text  # the test session runs under TRITON_INTERPRET=1
    assert "copy_pages: torch, triton, cpp" in text


def test_auto_prefers_cpp_on_cpu():
    assert registry.resolve("copy_pages", torch.device("cpu")) == "cpp"
    assert "cpp (auto on cpu)" in kvpo_kernels.explain("copy_pages", torch.zeros(1))


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.resolve("copy_pages", torch.device("cpu")) == "torch"
    assert registry.resolve("copy_pages", torch.device("cpu"), backend="triton") == "triton"
    assert registry.resolve("copy_pages", torch.device("cpu"), backend="auto") == "cpp"


def test_bad_names_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend= must be one of"):
        registry.resolve("copy_pages", torch.device("cpu"), backend="cuda")
    monkeypatch.setenv(registry.ENV_VAR, "tritn")
    with pytest.raises(ValueError, match="KVPO_KERNELS_BACKEND must be one of"):
        registry.resolve("copy_pages", torch.device("cpu"))
    with pytest.raises(KeyError, match="no op named 'nope'"):
        registry.resolve("nope", torch.device("cpu"))


def test_explicit_unavailable_backend_raises(monkeypatch):
    monkeypatch.setattr(registry, "TRITON_INTERPRET", False)
    with pytest.raises(registry.BackendUnavailable, match="TRITON_INTERPRET=1"):
        registry.resolve("copy_pages", torch.device("cpu"), backend="triton")
    with pytest.raises(registry.BackendUnavailable, match="built without CUDA"):
        registry.resolve("copy_pages", torch.device("cuda"), backend="cpp")


def test_auto_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(registry, "_cpp_reason", lambda device: "extension missing")
    assert registry.resolve("copy_pages", torch.device("cpu")) == "torch"
    why = kvpo_kernels.explain("copy_pages", torch.zeros(1))
    assert "torch (auto on cpu; skipped cpp: extension missing)" in why
