"""The environment switches (`trinity.switches`): parsed once, the same spellings for every boolean, a clear error
for a bad value, and TRINITY_KERNELS read alike by every dispatcher (the Triton and the C kernels)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trinity import switches

BOOLEANS = {"TRINITY_CPU_NATIVE": "cpu_native", "TRINITY_PDL": "pdl", "TRINITY_LAST_PROGRAM": "last_program"}


def test_import_reads_nothing_and_loads_no_torch():
    code = ("import sys, trinity.switches as s; assert s._current is None; assert 'torch' not in sys.modules; "
            "s.get(); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_defaults():
    assert switches.Switches.from_env({}) == switches.Switches()
    s = switches.Switches()
    assert (s.kernels, s.triton_interpret, s.cpu_native, s.pdl, s.last_program) == ("auto", False, True, False, True)


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "On", " yes ", "Yes\n"])
@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_boolean_true_spellings(name, raw):
    assert getattr(switches.Switches.from_env({name: raw}), BOOLEANS[name]) is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "OFF", " no ", "No\t"])
@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_boolean_false_spellings(name, raw):
    assert getattr(switches.Switches.from_env({name: raw}), BOOLEANS[name]) is False


@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_boolean_empty_means_default(name):
    field = BOOLEANS[name]
    assert getattr(switches.Switches.from_env({name: "  "}), field) == getattr(switches.Switches(), field)


@pytest.mark.parametrize("name", sorted(BOOLEANS))
def test_boolean_unknown_value_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"{name}='maybe' is not a boolean: use one of 1, true, on, yes .* 0, "
                                         "false, off, no"):
        switches.Switches.from_env({name: "maybe"})


def test_triton_interpret_as_triton_reads_it():
    for raw in ("1", "true", "ON", "yes"):
        assert switches.Switches.from_env({"TRITON_INTERPRET": raw}).triton_interpret
    for raw in ("0", "off", "", "2", "garbage"):  # Triton's variable: anything else is off, never our error
        assert not switches.Switches.from_env({"TRITON_INTERPRET": raw}).triton_interpret


@pytest.mark.parametrize("raw,mode", [("auto", "auto"), ("Triton", "triton"), ("REFERENCE", "reference"),
                                      (" reference ", "reference"), ("", "auto")])
def test_kernel_modes_any_case(raw, mode):
    assert switches.Switches.from_env({"TRINITY_KERNELS": raw}).kernels == mode


def test_unknown_kernel_mode_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"TRINITY_KERNELS='cuda' is not a kernel mode: use one of auto, triton, "
                                         r"reference"):
        switches.Switches.from_env({"TRINITY_KERNELS": "cuda"})


def test_parsed_once_until_refreshed(monkeypatch):
    monkeypatch.setenv("TRINITY_PDL", "1")
    first = switches.get()
    assert first.pdl and switches.get() is first  # cached: the environment is not read again
    import os

    os.environ["TRINITY_PDL"] = "0"  # behind the fixture's back: not seen until a refresh
    try:
        assert switches.get().pdl
        assert not switches.refresh().pdl and not switches.get().pdl
    finally:
        monkeypatch.setenv("TRINITY_PDL", "0")


def test_monkeypatch_fixture_refreshes_the_switches(monkeypatch):
    from trinity.kernels import last_program, native

    monkeypatch.setenv("TRINITY_LAST_PROGRAM", "off")
    assert not last_program.enabled()
    monkeypatch.delenv("TRINITY_LAST_PROGRAM")
    assert last_program.enabled()
    monkeypatch.setenv("TRINITY_CPU_NATIVE", "False")
    assert not native.enabled() and native.library() is None


def test_a_bad_value_raises_where_used(monkeypatch):
    from trinity import kernels

    monkeypatch.setenv("TRINITY_KERNELS", "fast")  # the fixture does not parse: setting it is fine
    with pytest.raises(ValueError, match="TRINITY_KERNELS='fast'"):
        kernels.use_triton(torch.zeros(1))


def test_refresh_takes_an_explicit_environment():
    try:
        assert switches.refresh({"TRINITY_KERNELS": "triton"}).kernels == "triton"
        assert switches.get().kernels == "triton"
    finally:
        switches.reset()


# ------------------------------------------------------------------ TRINITY_KERNELS=reference, any spelling
@pytest.mark.parametrize("spelling", ["reference", "Reference", "REFERENCE", " reference "])
def test_reference_in_any_case_turns_off_triton_and_the_c_kernels(monkeypatch, spelling):
    """The bug: `reference_forced()` compared the raw value with "reference" while `kernels_mode()` lower-cased
    it, so `TRINITY_KERNELS=Reference` turned off the Triton kernels but still ran the C (and oneDNN, and blocked
    prefill) CPU paths. Every dispatcher must now see the references forced."""
    from trinity import kernels
    from trinity.kernels import attention, linear, moe, norm

    monkeypatch.setenv("TRINITY_KERNELS", spelling)
    assert kernels.kernels_mode() == "reference" and kernels.reference_forced()
    q, kc = torch.randn(2, 4, 8), torch.randn(16, 2, 8)
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    gate_up = torch.randn(4, 10, 8)
    with torch.no_grad():
        assert not kernels.use_triton(q) and not attention.use_fast_path(q)
        assert not attention.native_decode_wanted(q, kc)
        assert not attention.blocked_prefill_wanted(q)
        assert not norm.native_wanted(x)
        assert not linear.native_wanted(x, w) and not linear.onednn_wanted(x, w)
        assert not moe.moe_layer_native_wanted(x, gate_up)


def test_auto_still_takes_the_cpu_fast_paths(monkeypatch):
    """The other side of the test above: without the references forced, CPU inference takes its fast paths."""
    from trinity.kernels import attention

    monkeypatch.setenv("TRINITY_KERNELS", "Auto")
    with torch.no_grad():
        assert attention.blocked_prefill_wanted(torch.randn(2, 4, 8))
